"""A small stand-in for an MLflow tracking server, on 127.0.0.1, for the tests that must see what
reaches a server over HTTP: the few REST routes the MLflow client calls for experiments and runs
(artifacts go to a local folder the runs name), every request's path and Authorization header
recorded. (An HTTP server is what a URI with a password points at; MLflow's own server is not
in mlflow-skinny.)"""

from __future__ import annotations

import base64
import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PREFIX = "/api/2.0/mlflow/"


class FakeMlflow:
    def __init__(self, artifacts: Path, user: str, password: str):
        self.artifacts = artifacts
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, route, Authorization)
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._answer("GET", {})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                self._answer("POST", body)

            def _answer(self, method: str, body: dict) -> None:
                url = urlsplit(self.path)
                query = {key: values[0] for key, values in parse_qs(url.query).items()}
                auth = self.headers.get("Authorization")
                with server.lock:
                    server.requests.append((method, url.path, auth))
                    if auth != server.expected:
                        status, reply = 401, {"error_code": "UNAUTHENTICATED"}
                    else:
                        status, reply = server.route(url.path.removeprefix(PREFIX),
                                                     {**query, **body})
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeMlflow":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def route(self, route: str, args: dict) -> tuple[int, dict]:
        if route == "experiments/get-by-name":
            found = [e for e in self.experiments.values() if e["name"] == args["experiment_name"]]
            if not found:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no experiment"}
            return 200, {"experiment": found[0]}
        if route == "experiments/create":
            experiment_id = str(next(self.ids))
            self.experiments[experiment_id] = {
                "experiment_id": experiment_id, "name": args["name"], "lifecycle_stage": "active",
                "artifact_location": (self.artifacts / experiment_id).as_uri()}
            return 200, {"experiment_id": experiment_id}
        if route == "experiments/get":
            return 200, {"experiment": self.experiments[args["experiment_id"]]}
        if route == "runs/create":
            run_id = f"run{next(self.ids)}"
            info = {"run_id": run_id, "run_uuid": run_id, "status": "RUNNING",
                    "experiment_id": args["experiment_id"], "run_name": args.get("run_name", ""),
                    "lifecycle_stage": "active", "start_time": args.get("start_time", 0),
                    "artifact_uri": (self.artifacts / run_id).as_uri()}
            self.runs[run_id] = {"info": info, "data": {"tags": args.get("tags", []),
                                                         "params": [], "metrics": []}}
            return 200, {"run": self.runs[run_id]}
        run = self.runs.get(args.get("run_id") or args.get("run_uuid") or "")
        if route == "runs/get" and run:
            return 200, {"run": run}
        if route == "runs/update" and run:
            run["info"]["status"] = args.get("status", run["info"]["status"])
            return 200, {"run_info": run["info"]}
        if route == "runs/log-batch" and run:
            run["data"]["params"] += args.get("params", [])
            run["data"]["metrics"] += args.get("metrics", [])
            run["data"]["tags"] += args.get("tags", [])
            return 200, {}
        if route in ("runs/log-parameter", "runs/log-metric", "runs/set-tag") and run:
            return 200, {}
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": route}
