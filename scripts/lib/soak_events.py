#!/usr/bin/env python3
"""The soak's event tally (scripts/soak.sh): once the node has nothing left to deliver, what
the controller holds of the `agent.started` events against the starts the soak made.

Every agent raises `agent.started` when it starts (agentbase, before it runs), with the field
`restarts`: how many starts of that agent came before, from a counter kept on disk. So every
start that got as far as raising has its own value, 0, 1, 2, ... per agent, and each must reach
the controller exactly once:

  duplicated  events beyond the first with the same (agent, restarts), or the same id;
  lost        per agent, starts known to have raised (every start the soak saw Running) that
              the controller does not hold, and values missing below the highest one beyond
              the starts that may not have raised (--early: processes killed within 0.3 s of
              starting, which may die before raising or even before counting the start).

Before counting it waits (up to --timeout) until no agent holds an unacknowledged event (every
<agent>/Event publication empty) and eventd has nothing pending. Prints one JSON line:
{"events_lost", "events_duplicated", "raised_at_least", "delivered", "problems"}.
"""

import argparse
import collections
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--agent-bin", required=True)
    p.add_argument("--data", required=True, help="the controller's data directory (CA, operator token)")
    p.add_argument("--listen", required=True, help="the controller's address")
    p.add_argument("--node-id", required=True)
    p.add_argument("--started", action="append", default=[], metavar="AGENT=N",
                   help="processes of AGENT the soak started that reached Running")
    p.add_argument("--early", action="append", default=[], metavar="AGENT=N",
                   help="processes of AGENT killed so early they may not have raised")
    p.add_argument("--timeout", type=float, default=60.0)
    return p.parse_args()


def counts(specs):
    return {a: int(n) for a, n in (s.split("=") for s in specs)}


def undelivered(args):
    """What is still on its way, in words; empty once everything reached the controller."""
    r = subprocess.run([args.agent_bin, "--root", args.root, "run", "ipcmonitor", "--list", "--json"],
                       capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return [f"ipcmonitor --list: exit {r.returncode}"]
    waiting = [f"{row['publication']}: {row['items']} unacknowledged" for row in json.loads(r.stdout)
               if row.get("topic") == "Event" and row.get("items")]
    r = subprocess.run([args.agent_bin, "--root", args.root, "run", "ipcmonitor", "eventd/EventdStatus", "--json"],
                       capture_output=True, text=True, timeout=10)
    for line in r.stdout.splitlines():
        item = json.loads(line)
        if item.get("key") is not None and item.get("value", {}).get("pending"):
            waiting.append(f"eventd: {item['value']['pending']} pending")
    return waiting


def started_events(args):
    """Every agent.started event of the node, from the operator API (`GET /api/v1/events`,
    1,000 a page, following `next`): the CLI prints at most the last 1,000."""
    ctx = ssl.create_default_context(cafile=os.path.join(args.data, "ca.crt.pem"))
    with open(os.path.join(args.data, "operator.token")) as f:
        token = f.read().strip()
    events, after = [], None
    while True:
        query = {"node": args.node_id, "kind": "agent.started", "limit": 1000}
        if after is not None:
            query["after"] = after
        request = urllib.request.Request(f"https://{args.listen}/api/v1/events?{urllib.parse.urlencode(query)}",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, context=ctx, timeout=30) as reply:
            page = json.load(reply)
        events.extend(page["events"])
        if not page["events"]:
            return events
        after = page["next"]


def main():
    args = parse_args()
    started, early = counts(args.started), counts(args.early)
    problems = []
    deadline = time.time() + args.timeout
    while True:
        waiting = undelivered(args)
        if not waiting or time.time() >= deadline:
            break
        time.sleep(0.2)
    if waiting:
        problems.append(f"not delivered within {args.timeout:.0f} s: {waiting}")

    events = started_events(args)
    ids = collections.Counter(e["id"] for e in events)
    values = collections.defaultdict(collections.Counter)
    for e in events:
        values[e["agent"]][dict(e.get("fields", [])).get("restarts")] += 1
    duplicated = sum(n - 1 for n in ids.values() if n > 1)
    lost = 0
    for agent in sorted(set(started) | set(values)):
        seen = values.get(agent, collections.Counter())
        duplicated += sum(n - 1 for n in seen.values() if n > 1)
        numbers = sorted(int(v) for v in seen if v is not None and v.isdigit())
        missing = (numbers[-1] + 1 - len(numbers)) if numbers else 0
        short = started.get(agent, 0) - len(numbers)
        agent_lost = max(0, short, missing - early.get(agent, 0))
        if agent_lost:
            problems.append(f"{agent}: {started.get(agent, 0)} starts reached Running, "
                            f"{early.get(agent, 0)} killed early; the controller holds restarts "
                            f"values {numbers[:3]}...{numbers[-3:]} ({len(numbers)} distinct)")
        lost += agent_lost
    print(json.dumps({"events_lost": lost, "events_duplicated": duplicated,
                      "raised_at_least": sum(started.values()), "delivered": len(events),
                      "problems": problems}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
