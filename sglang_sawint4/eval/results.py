"""The accuracy results file (bench/results/accuracy.json) shared by the eval scripts.

Each script owns some rows and replaces only those: eval_accuracy.py the perplexity /
agreement / KL rows of its methods, eval_tasks.py and eval_passkey.py the ``task_acc``
rows of their (model, method, block, rotate, task); sglang_sawint4.eval.served the ``served``
entry of its model (the served-vs-harness comparison, outside the rows' schema).
``merge_results`` folds a results file written elsewhere (the GPU host) into this one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time

import torch

from sglang_sawint4.serving.server import command_line


def add_common_args(parser, seed: int = 0):
    """The arguments every task eval takes: the model, where results go, the seed, CPU threads."""
    parser.add_argument("--model", required=True, help="converted model directory (scripts/prepare_eval_data.sh)")
    parser.add_argument("--model-name", required=True, help="the model's name in the results rows")
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--out", required=True, help="the accuracy results file (rows are merged into it)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on the GPU host (float32 either way)")


def task_row(model_name, method, task, correct, n, context=None) -> dict:
    """A ``task_acc`` row: accuracy over n examples with its binomial standard error."""
    acc = correct / n
    row = {"model": model_name, "method": method.row_name, "block": method.block, "rotate": method.rotate,
           "metric": "task_acc", "context": context, "value": acc, "n": n,
           "stderr": math.sqrt(acc * (1 - acc) / n), "task": task, "corpus": None}
    if getattr(method, "policy", None) is not None:
        row["policy"] = method.policy.summary()
    return row


def run_info(t0: float, device: str = "cpu") -> dict:
    """What ran, where, and for how long (stored next to the rows)."""
    on_gpu = torch.device(device).type == "cuda"
    return {"command": command_line(), "device": "cuda" if on_gpu else "cpu",
            "machine": torch.cuda.get_device_name(device) if on_gpu else f"{platform.machine()} {os.cpu_count()} cores",
            "torch": torch.__version__, "seconds": round(time.time() - t0, 1)}


def load_results(path: str) -> dict:
    """The results file's content, or an empty one."""
    if not os.path.exists(path):
        return {"rows": [], "runs": {}}
    with open(path) as f:
        return json.load(f)


def save_results(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def _replace_rows(result: dict, rows: list, task_rows: bool) -> dict:
    """``rows`` replace the rows of their own kind (task or not) with the same (model, method,
    block, rotate, task, context); every other row stays."""
    def key(r):
        return r["model"], r["method"], r["block"], r["rotate"], r.get("task"), r.get("context")

    mine = {key(r) for r in rows}
    result["rows"] = [r for r in result["rows"]
                      if (r.get("metric") == "task_acc") != task_rows or key(r) not in mine] + rows
    return result


def merge_method_rows(result: dict, rows: list) -> dict:
    """Put an eval_accuracy run's rows into the results: they replace the rows of the same
    (model, method, block, rotate, context); task rows and every other row stay."""
    return _replace_rows(result, rows, task_rows=False)


def merge_task_rows(path: str, rows: list, model_name: str, run_key: str, run: dict) -> dict:
    """Replace this run's task rows (same task and context) in the results file (other rows
    stay); returns the file's content."""
    result = _replace_rows(load_results(path), rows, task_rows=True)
    result["runs"].setdefault(model_name, {})[run_key] = run
    save_results(path, result)
    return result


def merge_results(result: dict, other: dict) -> dict:
    """``other``'s rows replace the rows they would replace had their runs written into
    ``result`` (method rows by context, task rows by task); its run records are added
    per model, replacing records of the same name; so are its served checks, per model."""
    result = merge_method_rows(result, [r for r in other["rows"] if r.get("metric") != "task_acc"])
    result = _replace_rows(result, [r for r in other["rows"] if r.get("metric") == "task_acc"], task_rows=True)
    for model, runs in other["runs"].items():
        result["runs"].setdefault(model, {}).update(runs)
    for model, served in other.get("served", {}).items():
        result.setdefault("served", {})[model] = served
    return result
