/* workq.h: a fixed pool of threads running queued work items (FIFO).
 * Items are intrusive (struct xwork, embedded by their owner): queueing never
 * allocates and never fails. */
#ifndef XNBD_WORKQ_H
#define XNBD_WORKQ_H

/* Intrusive work item: lets a backend queue a request on a work queue
 * (workq.h) without allocating. */
struct xwork {
  void (*fn)(struct xwork *w);
  struct xwork *next;
};


struct workq;

/* Starts nthreads threads.  Returns NULL with errno on failure. */
struct workq *workq_new(unsigned nthreads, const char *name);
void workq_submit(struct workq *wq, struct xwork *w);
/* Ahead of everything queued (a client waits on it). */
void workq_submit_first(struct workq *wq, struct xwork *w);
/* Behind everything: run only when nothing else is queued, by at most
 * half the threads and half the CPUs this process may use at once (at
 * least one), so
 * that work that only uses
 * the CPU (hashing seed blocks) does not hold up the landings of data a
 * link delivers, nor take every core from the threads feeding that link. */
void workq_submit_low(struct workq *wq, struct xwork *w);
/* How many low-lane items may run at once. */
unsigned workq_low_max(const struct workq *wq);
/* If w still waits in the low lane, moves it to the head of the queue (a
 * client now waits on it); else does nothing. */
void workq_promote(struct workq *wq, struct xwork *w);
/* Runs every queued item, joins the threads and frees the pool. */
void workq_free(struct workq *wq);

#endif
