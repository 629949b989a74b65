"""``python -m lora_trainer bench api`` (also ``python -m lora_trainer.app.bench_api``): the HTTP API under load,
on the tiny model.

Prints the time from ``POST /jobs`` to the job's first step event, and the job's steps/s with 0 and with 50
concurrent Server-Sent-Events clients following it (target: at most 5 % slower). Runs the real app (uvicorn on a
free local port) with the real job runner, in a temporary folder.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

from ..tiny_model.build import TINY_MODEL_PATH
from ..tiny_model.demo import SAMPLE_DATASET, training_arguments


def tiny_job_options(output_dir: Path, epochs: int = 1) -> dict:
    """The demo run's options (tiny model, sample dataset, resolution 64) as the API takes them."""
    from ..training.options import non_default, parse_args

    options, _ = parse_args(training_arguments(output_dir, epochs))
    return non_default(options)


def tiny_settings(folder: Path):
    """App settings whose roots hold the tiny model and the sample dataset."""
    from .settings import AppSettings

    return AppSettings(lora_folder=folder / "loras", data_folder=folder / "data", dataset_roots=[SAMPLE_DATASET],
                       checkpoint_folders=[TINY_MODEL_PATH.parent], unload_checkpoint_while_training=False)


class _NoHost:
    """Nothing to free or refresh: the bench measures the API and the job only."""

    name = "standalone"

    def refresh_loras(self) -> None:
        pass

    def release_gpu(self) -> None:
        pass

    def restore_gpu(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _request(port: int, method: str, path: str, body: dict | None = None) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = json.loads(response.read())
    if response.status >= 400:
        raise RuntimeError(f"{method} {path}: {response.status} {data}")
    return data


def _follow(port: int, job_id: int, counts: list[int], index: int) -> None:
    """One SSE client reading the whole stream."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("GET", f"/lora-trainer/v1/jobs/{job_id}/events")
    response = connection.getresponse()
    for line in response:
        if line.startswith(b"data: "):
            counts[index] += 1


def _steps_per_second(events_path: Path) -> tuple[float, int]:
    from ..training.events import read_events

    steps = [event for event in read_events(events_path)[0] if event["event"] == "step"]
    if len(steps) < 3:
        return float("nan"), len(steps)
    # from the second step on: the first carries the warm-up
    return (len(steps) - 2) / (steps[-1]["time"] - steps[1]["time"]), len(steps)


def run_job(port: int, services, name: str, epochs: int, clients: int) -> dict:
    from ..training.events import read_events

    options = tiny_job_options(services.settings.lora_folder, epochs)
    posted = time.perf_counter()
    posted_wall = time.time()
    job = _request(port, "POST", "/lora-trainer/v1/jobs", {"name": name, "options": options})
    counts = [0] * clients
    followers = [threading.Thread(target=_follow, args=(port, job["id"], counts, i), daemon=True) for i in range(clients)]
    for follower in followers:
        follower.start()
    events_path = Path(job["folder"]) / "events.jsonl"
    first_step = None
    while True:
        current = services.store.get(job["id"])
        if first_step is None:
            steps = [e for e in read_events(events_path)[0] if e["event"] == "step"]
            if steps:
                first_step = steps[0]["time"] - posted_wall
        if current.status not in ("queued", "running"):
            break
        time.sleep(0.05)
    for follower in followers:
        follower.join(timeout=30)
    rate, steps = _steps_per_second(events_path)
    return {"status": current.status, "first_step": first_step, "steps_per_second": rate, "steps": steps,
            "wall": time.perf_counter() - posted, "events_per_client": min(counts) if counts else None}


def main(argv: list[str] | None = None) -> int:
    import uvicorn
    from fastapi import FastAPI

    from .api import register
    from .services import Services

    parser = argparse.ArgumentParser(prog="python -m lora_trainer bench api", description=__doc__)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the measured runs (40 steps each)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent event-stream clients")
    parser.add_argument("--work-dir", type=Path, help="where the jobs and LoRAs go (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lora-trainer-bench-api-") as temporary:
        folder = args.work_dir or Path(temporary)
        services = Services.create(tiny_settings(folder), _NoHost(), poll=0.1)
        app = FastAPI()
        register(app, services, listening_remotely=False)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        try:
            first = run_job(port, services, "bench-first-step", 1, 0)
            quiet = run_job(port, services, "bench-no-clients", args.epochs, 0)
            loaded = run_job(port, services, "bench-with-clients", args.epochs, args.clients)
        finally:
            server.should_exit = True
            services.close()
    print(f"POST /jobs → first step event: {first['first_step']:.2f} s (target ≤ 5 s)")
    print(f"steps/s with 0 event-stream clients: {quiet['steps_per_second']:.2f} ({quiet['steps']} steps)")
    print(f"steps/s with {args.clients} event-stream clients: {loaded['steps_per_second']:.2f} "
          f"({loaded['steps']} steps; each client got {loaded['events_per_client']} events)")
    slower = 100 * (1 - loaded["steps_per_second"] / quiet["steps_per_second"])
    print(f"slow-down with {args.clients} clients: {slower:.1f} % (target ≤ 5 %)")
    return 0 if all(run["status"] == "finished" for run in (first, quiet, loaded)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
