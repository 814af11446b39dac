#!/usr/bin/env python3
"""console-check.py CONSOLE... : the guest's own proof that it kept running.

CONSOLEs: the serial output of one guest (scripts/vm/guest.sh) at each
site it ran at, in order (A, then B, ...), as written by console-stamp.py
(each line prefixed with the host's clock) or plain (-serial file:).  A
line cut by a move (the file does not end in a newline) goes on at the
next site.

Checks: no "FAIL" line; the counter n=N goes up by exactly one from line
to line across all sites (no reset, no jump back, none lost); so does the
ticker t=K when there is one (xnbd.tick=MS), but for one tick line that
may be missing where the guest moved: written by the guest just before
the site it left stopped, it can die in that QEMU's serial backend (the
guest's state is not lost: its next tick is the one after; seen once, in
a CI run of test-vm-migrate-faults).  Prints one JSON object:

  ok, fails (the first FAIL lines), counter_error, n_first, n_last,
  ticks_lost_at_moves (tick lines missing where the guest moved, at most
  one per move),
  rounds: counter lines per site, ticks: tick lines per site,
  with stamps and ticks: max_gap_ms (the longest time between two
  consecutive tick lines: the guest-side downtime, plus up to one tick
  period), max_gap_sites ("0->1": it spans the move from the first site
  to the second; "1": within the second), median_gap_ms (the tick period
  as the guest ran), switch_gap_ms (last tick at one site -> first at the
  next; one per move), first_tick_after: host time of the first tick at
  each site but the first.

Exit status: 0 ok, 1 the guest's proof fails, 2 usage or unreadable."""
import json
import re
import sys

STAMP = re.compile(r"^(\d+\.\d+) (.*)$")


def read_sites(paths):
    """[(site, stamp or None, text)], gluing lines cut by a move."""
    out = []
    carry = None
    for site, path in enumerate(paths):
        try:
            data = open(path, "rb").read().decode("ascii", "replace")
        except OSError as e:
            print("console-check.py: %s" % e, file=sys.stderr)
            sys.exit(2)
        lines = data.split("\n")
        partial = lines.pop()            # "" when the file ends in a newline
        for i, l in enumerate(lines + ([partial] if partial else [])):
            m = STAMP.match(l)
            ts, text = (float(m.group(1)), m.group(2)) if m else (None, l)
            if carry is not None and i == 0:
                text = carry + text      # keeps this site's stamp: it ended here
                carry = None
            if partial and i == len(lines):
                carry = text
                continue
            out.append((site, ts, text))
    if carry is not None:
        out.append((len(paths) - 1, None, carry))
    return out


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    paths = sys.argv[1:]
    lines = read_sites(paths)
    res = {"ok": True, "fails": [], "counter_error": "", "n_first": None, "n_last": None,
           "rounds": [0] * len(paths), "ticks": [0] * len(paths), "ticks_lost_at_moves": 0}
    ticks = []
    last = {}
    last_site = {}
    for site, ts, text in lines:
        if "xnbd-vm: " not in text:
            continue
        body = text[text.index("xnbd-vm: ") + 9:]
        if body.startswith("FAIL"):
            res["fails"].append("site %d: %s" % (site, body))
            continue
        for key, rx in (("n", r"n=(\d+) up="), ("t", r"t=(\d+)$")):
            m = re.match(rx, body)
            if not m:
                continue
            v = int(m.group(1))
            if key == "t" and key in last and v == last[key] + 2 and site > last_site[key]:
                res["ticks_lost_at_moves"] += 1      # (one per move at most: see above)
            elif key in last and v != last[key] + 1 and not res["counter_error"]:
                res["counter_error"] = "%s went from %d to %d (site %d)" % (key, last[key], v, site)
            last[key] = v
            last_site[key] = site
            if key == "n":
                res["rounds"][site] += 1
                res["n_first"] = v if res["n_first"] is None else res["n_first"]
                res["n_last"] = v
            else:
                res["ticks"][site] += 1
                if ts is not None:
                    ticks.append((ts, site))
    if res["fails"] or res["counter_error"] or res["n_last"] is None:
        res["ok"] = False
    if res["n_last"] is None:
        res["counter_error"] = res["counter_error"] or "no counter line at all"
    res["fails"] = res["fails"][:5]
    if len(ticks) > 2:
        gaps = [(ticks[i][0] - ticks[i - 1][0], ticks[i - 1][1], ticks[i][1]) for i in range(1, len(ticks))]
        g, s0, s1 = max(gaps)
        res["max_gap_ms"] = round(g * 1000, 1)
        res["max_gap_sites"] = "%d->%d" % (s0, s1) if s0 != s1 else "%d" % s0
        srt = sorted(x[0] for x in gaps)
        res["median_gap_ms"] = round(srt[len(srt) // 2] * 1000, 1)
        res["switch_gap_ms"] = [round(x[0] * 1000, 1) for x in gaps if x[1] != x[2]]
        res["first_tick_after"] = [ticks[i][0] for i in range(1, len(ticks)) if ticks[i][1] != ticks[i - 1][1]]
    print(json.dumps(res))
    sys.exit(0 if res["ok"] else 1)


main()
