"""Maintainer tool: cut the fine-tune's *unseen* evaluation sets out of public prompt sets.

    python -m refusal_audit.server.embedded.vendor_eval_sets --source DATASETS_DIR

`DATASETS_DIR` holds `refusal_direction/splits/{harmful,harmless}_test.json` (andyrdt/refusal_direction,
Apache-2.0; harmful prompts from StrongREJECT, HarmBench, JailbreakBench, MaliciousInstruct; harmless
ones Alpaca instructions) and `xstest/xstest_prompts.csv` (XSTest v2, CC BY 4.0). The output,
`data/unseen_eval.jsonl`, is shipped with the package (the build never reads `DATASETS_DIR`). The
draw is seeded, so rerunning the tool reproduces the file byte for byte; prompts that collide with
any fine-tune training prompt (after `finetune.normalize_prompt`) are dropped before drawing.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path
from typing import Any

from .finetune import UNSEEN_EVAL_PATH, normalize_prompt, training_prompts

N_HARMFUL = 100
N_BENIGN = 100
SEED = 20241203


def _draw(rows: list[dict[str, Any]], n: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    """`n` rows in a seeded order, skipping prompts that normalise like a training prompt or an
    earlier row."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    out: list[dict[str, Any]] = []
    seen = set(exclude)
    for row in order:
        key = normalize_prompt(row["prompt"])
        if key in seen:
            continue
        seen.add(key)
        out.append(row)
        if len(out) == n:
            break
    return out


def unseen_rows(source: Path) -> list[dict[str, Any]]:
    """Rows {set, label, source, category, prompt} of the three unseen sets."""
    exclude = {normalize_prompt(p) for p in training_prompts()}
    rd = source / "refusal_direction" / "splits"
    harmful = [{"set": "unseen_harmful", "label": "harmful", "source": "refusal_direction/harmful_test",
                "category": r.get("category") or "", "prompt": r["instruction"].strip()}
               for r in json.loads((rd / "harmful_test.json").read_text())]
    benign = [{"set": "unseen_benign", "label": "harmless", "source": "refusal_direction/harmless_test (Alpaca)",
               "category": "", "prompt": r["instruction"].strip()}
              for r in json.loads((rd / "harmless_test.json").read_text())]
    with (source / "xstest" / "xstest_prompts.csv").open(newline="", encoding="utf-8") as fh:
        xs = [{"set": "xstest_" + r["label"], "label": "harmless" if r["label"] == "safe" else "harmful",
               "source": "xstest_v2", "category": r["type"], "prompt": r["prompt"].strip()}
              for r in csv.DictReader(fh)]
    xs_keep = [r for r in xs if normalize_prompt(r["prompt"]) not in exclude]
    return (_draw(harmful, N_HARMFUL, SEED, exclude) + _draw(benign, N_BENIGN, SEED + 1, exclude)
            + sorted(xs_keep, key=lambda r: (r["set"], r["category"], r["prompt"])))


def main(argv: list[str] | None = None) -> None:
    """Write `data/unseen_eval.jsonl` from the public sets under `--source`."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with refusal_direction/ and xstest/")
    parser.add_argument("--out", type=Path, default=UNSEEN_EVAL_PATH)
    args = parser.parse_args(argv)
    rows = unseen_rows(args.source)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
