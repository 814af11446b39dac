#include "workq.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sched.h>
#include <unistd.h>
#include <stdio.h>
#include <string.h>

struct workq {
  pthread_mutex_t lock;        /* protects everything below */
  pthread_cond_t cond;
  struct xwork *head, *tail;
  struct xwork *lhead, *ltail;  /* the low lane (workq_submit_low) */
  unsigned low_running, low_max;
  bool stopping;
  unsigned nthreads;
  pthread_t *threads;
};

/* Under lock: takes the first item of a non-empty lane. */
static struct xwork *pop_front_locked(struct xwork **head, struct xwork **tail)
{
  struct xwork *w = *head;
  *head = w->next;
  if (!*head) *tail = NULL;
  return w;
}

static void *worker(void *arg)
{
  struct workq *wq = arg;
  pthread_mutex_lock(&wq->lock);
  for (;;) {
    struct xwork *w = wq->head;
    bool low = false;
    if (w) {
      pop_front_locked(&wq->head, &wq->tail);
    } else if (wq->lhead && (wq->low_running < wq->low_max || wq->stopping)) {
      w = pop_front_locked(&wq->lhead, &wq->ltail);
      low = true;
      wq->low_running++;
    } else {
      if (wq->stopping && !wq->lhead)
        break;
      pthread_cond_wait(&wq->cond, &wq->lock);
      continue;
    }
    pthread_mutex_unlock(&wq->lock);
    w->fn(w);
    pthread_mutex_lock(&wq->lock);
    if (low) {
      wq->low_running--;
      if (wq->lhead) pthread_cond_signal(&wq->cond);   /* a waiter may take it */
    }
  }
  pthread_mutex_unlock(&wq->lock);
  return NULL;
}

struct workq *workq_new(unsigned nthreads, const char *name)
{
  struct workq *wq = calloc(1, sizeof *wq);
  if (!wq) return NULL;
  pthread_mutex_init(&wq->lock, NULL);
  pthread_cond_init(&wq->cond, NULL);
  /* CPU-only work: half the threads, and at most half the cores (the
   * pump threads and, on a shared machine, the other end need the rest). */
  cpu_set_t set;                  /* the CPUs this process may use */
  long cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set)
                                                          : sysconf(_SC_NPROCESSORS_ONLN);
  unsigned half_cpus = cpus >= 4 ? (unsigned) (cpus / 2) : 1;
  wq->low_max = nthreads / 2 ? nthreads / 2 : 1;
  if (wq->low_max > half_cpus) wq->low_max = half_cpus;
  wq->threads = calloc(nthreads, sizeof *wq->threads);
  if (!wq->threads) { free(wq); return NULL; }
  for (unsigned i = 0; i < nthreads; i++) {
    int e = pthread_create(&wq->threads[i], NULL, worker, wq);
    if (e) {
      errno = e;
      workq_free(wq);
      return NULL;
    }
    if (name) {
      char n[32];
      snprintf(n, sizeof n, "%.8s-%u", name, i % 1000);
      n[15] = '\0';
      pthread_setname_np(wq->threads[i], n);
    }
    wq->nthreads++;
  }
  return wq;
}

/* Under lock: w at the end of the lane head/tail, or at the head of the
 * main queue; a waiting worker is woken. */
static void push_back_locked(struct workq *wq, struct xwork **head, struct xwork **tail,
                             struct xwork *w)
{
  w->next = NULL;
  if (*tail) (*tail)->next = w;
  else *head = w;
  *tail = w;
  pthread_cond_signal(&wq->cond);
}

static void push_front_locked(struct workq *wq, struct xwork *w)
{
  w->next = wq->head;
  wq->head = w;
  if (!wq->tail) wq->tail = w;
  pthread_cond_signal(&wq->cond);
}

void workq_submit(struct workq *wq, struct xwork *w)
{
  pthread_mutex_lock(&wq->lock);
  push_back_locked(wq, &wq->head, &wq->tail, w);
  pthread_mutex_unlock(&wq->lock);
}

void workq_submit_first(struct workq *wq, struct xwork *w)
{
  pthread_mutex_lock(&wq->lock);
  push_front_locked(wq, w);
  pthread_mutex_unlock(&wq->lock);
}

unsigned workq_low_max(const struct workq *wq) { return wq->low_max; }

void workq_submit_low(struct workq *wq, struct xwork *w)
{
  pthread_mutex_lock(&wq->lock);
  push_back_locked(wq, &wq->lhead, &wq->ltail, w);
  pthread_mutex_unlock(&wq->lock);
}

void workq_promote(struct workq *wq, struct xwork *w)
{
  pthread_mutex_lock(&wq->lock);
  struct xwork *prev = NULL;
  for (struct xwork *x = wq->lhead; x; prev = x, x = x->next) {
    if (x != w) continue;
    if (prev) prev->next = w->next;
    else wq->lhead = w->next;
    if (wq->ltail == w) wq->ltail = prev;
    push_front_locked(wq, w);
    break;
  }
  pthread_mutex_unlock(&wq->lock);
}

void workq_free(struct workq *wq)
{
  if (!wq) return;
  pthread_mutex_lock(&wq->lock);
  wq->stopping = true;
  pthread_cond_broadcast(&wq->cond);
  pthread_mutex_unlock(&wq->lock);
  for (unsigned i = 0; i < wq->nthreads; i++)
    pthread_join(wq->threads[i], NULL);
  pthread_cond_destroy(&wq->cond);
  pthread_mutex_destroy(&wq->lock);
  free(wq->threads);
  free(wq);
}
