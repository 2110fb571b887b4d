"""`parafill engine`: serve the denoiser to a team's editors from a Ray cluster (docs/TEAM_ENGINE.md).

Starts a Ray cluster of its own on this machine (or joins one with --address),
deploys the denoiser as a Ray Serve application (one model per replica), and
serves it over HTTP on 127.0.0.1 unless told otherwise. Every request needs the
engine's token. Runs in the foreground until Ctrl-C or SIGTERM; a cluster it
started stops with it, a cluster it joined keeps running without its engine.
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import signal
import sys
import time
from dataclasses import replace

from team_engine.app import APP_NAME, EngineOptions
from team_engine.auth import TOKEN_ENV, TokenError, digest, engine_token

DEFAULT_PORT = 8765


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def at_least_zero(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parafill engine", description=__doc__.split("\n\n")[0])
    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="DIR|NAME", default=None,
                       help="model directory or pulled model name (default: the embedded model)")
    model.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where each replica runs its model (default: auto = cuda if the replica's node has one)")
    model.add_argument("--threads", type=positive(int), default=1,
                       help="CPU threads of each replica's model (default 1)")
    scale = p.add_argument_group("replicas and batching")
    scale.add_argument("--replicas", type=positive(int), default=1, help="model replicas (default 1)")
    scale.add_argument("--cpus-per-replica", type=at_least_zero(float), default=None,
                       help="CPUs Ray reserves for each replica (default: --threads)")
    scale.add_argument("--gpus-per-replica", type=at_least_zero(float), default=None,
                       help="GPUs Ray reserves for each replica (default: 1 with --device cuda, else 0)")
    scale.add_argument("--max-batch-size", type=positive(int), default=16,
                       help="fills a replica's model denoises together, sharing each step (default 16); fills "
                            "arriving while a batch runs join it at the next step")
    scale.add_argument("--documents-per-replica", type=positive(int), default=64,
                       help="documents whose context each replica keeps cached (default 64)")
    scale.add_argument("--max-ongoing-requests", type=positive(int), default=64,
                       help="requests a replica takes at once before Ray Serve queues more (default 64)")
    where = p.add_argument_group("cluster and network")
    where.add_argument("--address", default=None,
                       help="join this Ray cluster (e.g. auto, or HOST:6379) instead of starting one on 127.0.0.1")
    where.add_argument("--num-cpus", type=positive(float), default=None,
                       help="CPUs of the cluster this command starts (default: this machine's)")
    where.add_argument("--num-gpus", type=at_least_zero(float), default=None,
                       help="GPUs of the cluster this command starts (default: this machine's)")
    where.add_argument("--host", default="127.0.0.1",
                       help="address the engine listens on (default 127.0.0.1: this machine only)")
    where.add_argument("--port", type=positive(int), default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    where.add_argument("--token-file", metavar="FILE", default=None,
                       help=f"the engine's token (used when {TOKEN_ENV} is not set); a file that does not "
                            "exist yet is created with a fresh random token, readable by you only")
    where.add_argument("--ray-temp-dir", metavar="DIR", default=None,
                       help="where the cluster this command starts keeps its sockets and logs: a new "
                            "folder is made inside DIR and removed on exit (default: /tmp; keep the path short, "
                            "Ray's socket paths must fit in 107 characters)")
    return p


def options_from(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(model=args.model, device=args.device, replicas=args.replicas, threads=args.threads,
                         cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                         max_batch_size=args.max_batch_size, documents_per_replica=args.documents_per_replica,
                         max_ongoing_requests=args.max_ongoing_requests)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def say(message: str) -> None:
    print(f"parafill engine: {message}", file=sys.stderr, flush=True)


def check_health(host: str, port: int, token: str) -> dict:
    """The engine's answer to GET /v1/health with the token, through Serve's proxy."""
    connection = http.client.HTTPConnection("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port, timeout=30)
    try:
        connection.request("GET", "/v1/health", headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        return json.loads(body)
    finally:
        connection.close()


def proxy_checks_token(host: str, port: int) -> bool:
    """Whether Serve's proxy itself refuses a request without the token (its own /-/healthz route)."""
    connection = http.client.HTTPConnection("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port, timeout=30)
    try:
        connection.request("GET", "/-/healthz")
        response = connection.getresponse()
        response.read()
        return response.status == 401
    finally:
        connection.close()


def run(args: argparse.Namespace) -> int:
    from team_engine.cluster import EngineStartError

    try:
        token, token_source = engine_token(args.token_file, create=True)
    except TokenError as exc:
        say(f"error: {exc}")
        return 2
    if not is_loopback(args.host):
        say(f"warning: listening on {args.host}, not 127.0.0.1: other machines can reach the engine, and plain "
            "HTTP carries the token in clear text; prefer an SSH tunnel, or a TLS proxy in front of the engine")
    options = options_from(args)
    if options.device == "auto" and args.address is None:  # this machine is the cluster: ask it now
        options = replace(options, device="cuda" if _cuda_devices() else "cpu")
    token_sha256 = digest(token)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: the cluster goes down with us
    started_clusters: list = []  # the cluster, once there is one: stopped below whatever happens
    code = 0
    try:
        _start(args, options, token, token_source, token_sha256, started, started_clusters)
        while True:
            time.sleep(3600)
    except EngineStartError as exc:
        say(f"error: {exc}")
        code = 1
    except (KeyboardInterrupt, SystemExit):
        say("stopping")
    finally:
        for cluster in started_clusters:
            _stop(cluster)
            if cluster.local:
                # The cluster is gone: Ray's exit handlers would only wait for it. Leave now.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
    return code


def _start(args: argparse.Namespace, options: EngineOptions, token: str, token_source: str, token_sha256: str,
           started: float, clusters: list) -> None:
    """Start or join the cluster (appended to `clusters`, for the caller to stop), deploy, check."""
    from team_engine.app import build_application
    from team_engine.cluster import EngineStartError, connect_cluster, serve_engine, start_local_cluster

    if args.address:
        say(f"joining the Ray cluster at {args.address}")
        cluster = connect_cluster(args.address, token_sha256)
    else:
        cpus = args.num_cpus if args.num_cpus is not None else float(os.cpu_count() or 1)
        gpus = args.num_gpus
        if gpus is None:
            gpus = float(_cuda_devices()) if options.device == "cuda" else 0.0
        say(f"starting a Ray cluster on 127.0.0.1 ({cpus:g} CPUs, {gpus:g} GPUs)")
        cluster = start_local_cluster(cpus, gpus, token_sha256, temp_dir=args.ray_temp_dir)
    clusters.append(cluster)
    # ray.init puts Ray's own SIGTERM handler in place, which ends the process before the engine is
    # removed from the cluster: stop on SIGTERM as on Ctrl-C again.
    signal.signal(signal.SIGTERM, _interrupt)
    say(f"deploying {options.replicas} replica(s) of {options.model or 'the embedded model'} on {options.device}")
    serve_engine(build_application(options, token_sha256), args.host, args.port, app_name=APP_NAME)
    try:
        health = check_health(args.host, args.port, token)
    except (OSError, RuntimeError, ValueError) as exc:
        raise EngineStartError(f"the engine started but does not answer on {args.host}:{args.port}: {exc}") from exc
    url = f"http://{args.host if ':' not in args.host else '[' + args.host + ']'}:{args.port}"
    say(f"ready at {url} in {time.monotonic() - started:.0f} s: {health['model']} on {health['device']}, "
        f"{options.replicas} replica(s); token from {token_source}")
    if not proxy_checks_token(args.host, args.port):
        say("note: this cluster's Ray Serve proxy answers its own routes (/-/routes, /-/healthz) without the "
            "token; every engine route still needs it. Start the cluster's nodes with "
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=team_engine.auth.proxy_middlewares to close those too")
    say(f"editors connect with `parafill serve --engine {url}` (or the `engine` setting) and the same token; "
        "Ctrl-C stops the engine")
    print(json.dumps({"url": url, "model": health["model"], "device": health["device"],
                      "replicas": options.replicas}), flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _stop(cluster) -> None:
    if not cluster.local:
        try:
            from ray import serve

            serve.delete(APP_NAME)  # the cluster and its other applications keep running
        except Exception as exc:
            say(f"warning: could not remove the engine from the cluster: {exc}")
    cluster.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
