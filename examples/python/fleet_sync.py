#!/usr/bin/env python3
"""Register servers with a fleetsync agent, start a sync and follow it with a resumable watch.

A client as another team writes one: stubs generated from the repository's proto/ with
grpcio-tools (see README.md beside this file), the health stubs from grpcio-health-checking.
Prints one JSON object per line: each server's outcome as it is recorded, a line when the
watch resumes, and the job's summary last. Exits as the `sync-agent` CLI does: 0 when every
server ended OK, 1 when some did not, 2 on a usage error, 3 when the agent refused a request,
4 when the agent could not be reached or did not answer in time.

    python3 fleet_sync.py --agent 127.0.0.1:50051 --user vito \\
        --server db-1=10.0.0.5:22 --server db-2=10.0.0.6:22:postgresql
"""

import argparse
import json
import os
import sys
import time
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(
    0, os.environ.get("FLEETSYNC_PY_OUT", os.path.join(os.path.dirname(__file__), "generated"))
)
from fleetsync.sync.v1 import (  # noqa: E402  (generated, found through the path above)
    fleet_pb2,
    fleet_pb2_grpc,
    outcome_pb2,
    sync_agent_pb2,
    sync_agent_pb2_grpc,
)

SERVICES = {
    "none": fleet_pb2.DATABASE_SERVICE_NONE,
    "mysql": fleet_pb2.DATABASE_SERVICE_MYSQL,
    "mariadb": fleet_pb2.DATABASE_SERVICE_MARIADB,
    "postgresql": fleet_pb2.DATABASE_SERVICE_POSTGRESQL,
}


def emit(**fields):
    print(json.dumps(fields), flush=True)


def parse_server(text):
    """NAME=HOST:PORT[:SERVICE], HOST may be [IPv6]."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ValueError(f"{text!r}: expected NAME=HOST:PORT[:SERVICE]")
    service = "mariadb"
    if rest.startswith("["):
        host, _, rest = rest[1:].partition("]")
        port, _, svc = rest.lstrip(":").partition(":")
    else:
        host, _, rest = rest.partition(":")
        port, _, svc = rest.partition(":")
    service = svc or service
    if service not in SERVICES:
        raise ValueError(f"{text!r}: service must be one of {', '.join(SERVICES)}")
    return fleet_pb2.ServerSpec(
        name=name, ip=host, port=int(port or 22), database_service=SERVICES[service]
    )


def outcome_line(event):
    o = event.outcome
    return dict(
        event="outcome",
        cursor=event.cursor,
        server_id=o.server_id,
        server=o.server_name,
        outcome=outcome_pb2.Outcome.Name(o.outcome).removeprefix("OUTCOME_"),
        cause=outcome_pb2.UnreachableCause.Name(o.cause).removeprefix("UNREACHABLE_CAUSE_"),
        message=o.message,
    )


def follow(sync, job_id, metadata, drop_after):
    """Streams the job from cursor 0 to its summary. After a dropped stream (a restarted agent,
    a load balancer, or `drop_after` to show it) the watch resumes after the last cursor seen,
    so no outcome is missed or repeated."""
    cursor, seen, outcomes = 0, 0, []
    while True:
        stream = sync.WatchSync(
            sync_agent_pb2.WatchSyncRequest(job_id=job_id, cursor=cursor), metadata=metadata
        )
        try:
            for event in stream:
                cursor = event.cursor
                if event.HasField("summary"):
                    return outcomes, event.summary
                line = outcome_line(event)
                outcomes.append(line)
                emit(**line)
                seen += 1
                if drop_after and seen == drop_after:
                    drop_after = 0
                    stream.cancel()
                    break
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise
            time.sleep(0.5)
        emit(event="resumed", after_cursor=cursor)


# The exit statuses shared with the `sync-agent` CLI (README: "Exit statuses and timeouts").
EXIT_OK, EXIT_NOT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
UNREACHABLE_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


def main():
    try:
        return run()
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return EXIT_UNREACHABLE if err.code() in UNREACHABLE_CODES else EXIT_REFUSED


def run():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent", default="127.0.0.1:50051", help="the agent's gRPC address")
    parser.add_argument("--token-file", help="file with the agent's bearer token")
    parser.add_argument("--ca", help="PEM CA of the agent's certificate (TLS)")
    parser.add_argument("--user", default="vito", help="SSH login user of the servers")
    parser.add_argument(
        "--server", action="append", default=[], metavar="NAME=HOST:PORT[:SERVICE]",
        help="a server to register (SERVICE: none, mysql, mariadb (default), postgresql)",
    )
    parser.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    parser.add_argument(
        "--drop-after", type=int, default=0, metavar="N",
        help="hang up the watch after N outcomes and resume from the cursor (a demonstration)",
    )
    args = parser.parse_args()
    try:
        specs = [parse_server(s) for s in args.server]
    except ValueError as err:
        parser.error(str(err))
    if not specs:
        parser.error("give at least one --server")

    metadata = []
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            metadata.append(("authorization", "Bearer " + f.read().strip()))
    if args.ca:
        with open(args.ca, "rb") as f:
            channel = grpc.secure_channel(args.agent, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.insecure_channel(args.agent)

    try:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fleetsync.sync.v1.SyncAgent"), timeout=5
        )
    except grpc.RpcError as err:
        print(f"error: the agent at {args.agent} does not answer: {err.details()}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if health.status != health_pb2.HealthCheckResponse.SERVING:
        print("error: the agent is not serving (its database may be down)", file=sys.stderr)
        return EXIT_UNREACHABLE

    fleet = fleet_pb2_grpc.FleetStub(channel)
    ids = []
    for spec in specs:
        spec.ssh_user = args.user
        stored = fleet.UpsertServer(
            fleet_pb2.UpsertServerRequest(spec=spec), metadata=metadata, timeout=10
        )
        ids.append(stored.server.id)
        emit(event="registered", server_id=stored.server.id, server=spec.name,
             created=stored.created)

    sync = sync_agent_pb2_grpc.SyncAgentStub(channel)
    started = sync.StartSync(
        sync_agent_pb2.StartSyncRequest(
            request_id=args.request_id or str(uuid.uuid4()),
            server_ids=ids,
            force=True,
            reason="python client example",
        ),
        metadata=metadata,
        timeout=10,
    )
    emit(event="started", job_id=started.job_id, created=started.created,
         server_count=started.server_count)

    outcomes, summary = follow(sync, started.job_id, metadata, args.drop_after)
    emit(
        event="summary",
        job_id=summary.job_id,
        state=sync_agent_pb2.JobState.Name(summary.state).removeprefix("JOB_STATE_"),
        total=summary.total,
        finished=summary.finished,
        outcomes={
            outcome_pb2.Outcome.Name(c.outcome).removeprefix("OUTCOME_"): c.count
            for c in summary.outcome_counts
        },
    )
    return EXIT_OK if all(o["outcome"] == "OK" for o in outcomes) else EXIT_NOT_OK


if __name__ == "__main__":
    sys.exit(main())
