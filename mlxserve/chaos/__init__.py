"""The chaos and cancellation harness (``mlxctl chaos``; docs/reliability.md).

It drives real daemons (``mlxctl serve`` subprocesses on 127.0.0.1, each with a temporary store
holding the tiny test model) with many concurrent clients that vanish in every phase of a
request, read slowly, or send malformed requests; it injects faults through seams that are inert
unless it turns them on; and after every scenario it checks named invariants (slots released,
no leaked tasks, threads or memory, survivors' answers identical to solo runs, well-formed
errors, nothing hung, the daemon answering, the store verifying clean).

    suite.py       run_chaos: every scenario against one set of daemons, then the report
    harness.py     the daemons, the solo references, running a scenario and checking it
    scenarios.py   the storm, the phase probes, the faults, queue overflow, a crash mid-create
    clients.py     request plans and the client that drives each to its planned end
    wire.py        a minimal HTTP/1.1 client on raw sockets (exact closes, tiny receive buffers)
    daemon.py      one daemon process, observed through /proc, /api/status and /metrics
    invariants.py  the named checks
    report.py      the JSON report and its table
"""
