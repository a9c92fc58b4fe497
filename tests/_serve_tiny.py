"""Serve the tiny seeded Llama with SAEs (`tiny.build_engine`) through the real server, for subprocess tests.

    python tests/_serve_tiny.py --data-dir DIR [--port 0] [--max-concurrent-jobs 1]

Prints ``READY <port>`` on stdout once the server is bound and serving. The model and SAEs are
rebuilt from fixed seeds, so a restarted server serves the same weights (greedy outputs match).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from refusal_audit.server.app import serve  # noqa: E402
from refusal_audit.server.config import ServerConfig  # noqa: E402
from tiny import build_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-concurrent-jobs", type=int, default=1)
    ap.add_argument("--token", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = ServerConfig(model="tiny-llama", host="127.0.0.1", port=args.port, data_dir=Path(args.data_dir),
                          max_concurrent_jobs=args.max_concurrent_jobs, auth_token=args.token, grace_s=1.0)

    def ready(handle: object) -> None:
        print(f"READY {handle.port}", flush=True)  # type: ignore[attr-defined]

    asyncio.run(serve(config, engine=build_engine(), ready=ready))


if __name__ == "__main__":
    main()
