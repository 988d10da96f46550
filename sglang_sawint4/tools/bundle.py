"""Offline bundle of SGLang 0.5.17 for air-gapped GPU hosts.

    # on a machine with PyPI access (any OS/Python): build for the target
    python -m sglang_sawint4.tools.bundle build --out .bundle/sglang-bundle.tar.xz

    # on the air-gapped target (Python 3.12, torch 2.11.0+cu130 preinstalled)
    python3 -m sglang_sawint4.tools.bundle install --bundle sglang-bundle.tar.xz --target /opt/sglang-site
    export PYTHONPATH=/opt/sglang-site:$PYTHONPATH

``build`` downloads the pinned wheels of ``bundle_requirements.txt`` (beside this module) for
the target platform, unpacks them into one folder, trims the libraries that
Hopper never loads, and packs the folder with xz -9.  ``install`` unpacks it and
imports every module SGLang's server needs at start-up (``STARTUP_IMPORTS``),
with the bundled transformers/tokenizers shadowing the host's.  ``install`` uses
the standard library only.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "bundle_requirements.txt"
MANIFEST = "sawint4_bundle_manifest.json"

# Files never loaded at run time on Hopper.  The sgl_kernel ones: FA3 is imported
# lazily by SGLang's fa3 backend only; FlashMLA/InfLLM serve MLA/sparse models;
# sm100 is Blackwell.  Together they are 1.2 GB of the 1.2 GB sglang-kernel wheel.
TRIM = [
    "sgl_kernel/flash_ops*.so",
    "sgl_kernel/flashmla_ops*.so",
    "sgl_kernel/infllm_ops*.so",
    "sgl_kernel/sm100/*",
    # a static library for building against xgrammar, never loaded (65 MB)
    "xgrammar/lib/*.a",
    # type stubs for IDE completion, never imported when IPython merely loads (30 MB)
    "jedi/third_party/typeshed/*",
]

# What `python -m sglang_sawint4.launch_server` imports before it serves (found by
# importing these with only the bundle and the host's packages; see docs/bundle.md).
STARTUP_IMPORTS = [
    "sglang",
    "sgl_kernel",
    "flashinfer",
    "xgrammar",
    "sglang.srt.server_args",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.entrypoints.openai.serving_chat",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.layers.attention.flashinfer_backend",
    "sglang.srt.models.llama",
    "sglang.srt.models.qwen2",
    "sglang.srt.models.qwen3",
]
PINNED_VERSIONS = {"transformers": "5.12.1", "tokenizers": "0.22.2", "sglang": "0.5.17"}


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            if "==" not in line:
                raise SystemExit(f"{path}: every requirement must be pinned with ==, got {line!r}")
            reqs.append(line)
    return reqs


def download(reqs: list[str], dest: Path, python_version: str) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                 "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux1_x86_64", "linux_x86_64", "any"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for p in platforms:
        cmd += ["--platform", p]
    wheels = []
    for i, req in enumerate(reqs, 1):
        name = req.split("==")[0]
        print(f"[{i}/{len(reqs)}] {req}", flush=True)
        subprocess.run(cmd + [req], check=True, stdout=subprocess.DEVNULL)
        norm = name.lower().replace("-", "_")
        version = req.split("==")[1]
        found = [w for w in dest.glob("*.whl")
                 if w.name.lower().startswith(norm + "-" + version.lower() + "-")]
        if not found:
            raise SystemExit(f"no wheel for {req} in {dest}")
        wheels.append(found[0])
    return wheels


def unpack_wheel(wheel: Path, site: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # wheels may carry <name>.data/{purelib,platlib}: those belong in site-packages
    for data in site.glob("*.data"):
        for sub in ("purelib", "platlib"):
            src = data / sub
            if src.is_dir():
                for item in src.iterdir():
                    target = site / item.name
                    if target.exists():
                        shutil.rmtree(target) if target.is_dir() else target.unlink()
                    shutil.move(str(item), str(target))
        shutil.rmtree(data)


def trim(site: Path) -> list[str]:
    removed = []
    for path in sorted(site.rglob("*")):
        rel = path.relative_to(site).as_posix()
        if path.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in TRIM):
            removed.append(rel)
            path.unlink()
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    return removed


def build(args) -> None:
    reqs = read_requirements()
    work = Path(args.work)
    site = work / "site"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    wheels = download(reqs, work / "wheels", args.python_version)
    for w in wheels:
        unpack_wheel(w, site)
    removed = trim(site)
    manifest = {"python": args.python_version, "requirements": reqs, "trimmed": removed,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "startup_imports": STARTUP_IMPORTS}
    (site / MANIFEST).write_text(json.dumps(manifest, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"packing {site} -> {out} (xz -9)", flush=True)
    with open(out, "wb") as f:
        tar = subprocess.Popen(["tar", "-C", str(site), "-cf", "-", "."], stdout=subprocess.PIPE)
        subprocess.run(["xz", "-9", "-T0", "-c"], stdin=tar.stdout, stdout=f, check=True)
        if tar.wait() != 0:
            raise SystemExit("tar failed")
    mib = out.stat().st_size / 2**20
    print(f"bundle: {out} {mib:.1f} MiB, {len(reqs)} packages, trimmed {len(removed)} files")
    if mib >= args.max_mib:
        raise SystemExit(f"bundle is {mib:.1f} MiB, over the {args.max_mib} MiB limit")


def verify(target: Path) -> dict:
    """Import the start-up modules in a fresh interpreter with the bundle first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(target) + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "import importlib, json, sys, time\n"
        f"mods = {STARTUP_IMPORTS!r}\n"
        "res = {}\n"
        "for m in mods:\n"
        "    t = time.time()\n"
        "    try:\n"
        "        importlib.import_module(m); res[m] = 'ok %.1fs' % (time.time() - t)\n"
        "    except BaseException as e:\n"
        "        res[m] = 'FAIL %s: %s' % (type(e).__name__, e)\n"
        "import transformers, tokenizers, sglang\n"
        "res['versions'] = {'transformers': transformers.__version__, 'tokenizers': tokenizers.__version__,"
        " 'sglang': sglang.__version__, 'transformers_path': transformers.__file__}\n"
        "print('BUNDLE_VERIFY ' + json.dumps(res))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("BUNDLE_VERIFY ")]
    if not line:
        raise SystemExit(f"verification crashed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[-1][len("BUNDLE_VERIFY "):])


def install(args) -> None:
    target = Path(args.target)
    target.mkdir(parents=True, exist_ok=True)
    t = time.time()
    with tarfile.open(args.bundle, "r:xz") as tar:
        tar.extractall(target, filter="data") if sys.version_info >= (3, 12) else tar.extractall(target)
    print(f"unpacked {args.bundle} into {target} in {time.time() - t:.1f}s", flush=True)
    res = verify(target)
    failed = {m: r for m, r in res.items() if m != "versions" and not r.startswith("ok")}
    for m, r in res.items():
        if m != "versions":
            print(f"  {m}: {r}")
    versions = res["versions"]
    print(f"  versions: {versions}")
    wrong = {k: v for k, v in PINNED_VERSIONS.items() if versions.get(k) != v}
    if failed or wrong:
        raise SystemExit(f"bundle verification failed: imports {list(failed)}, versions {wrong}")
    print(f"OK. Use it with: export PYTHONPATH={target}:$PYTHONPATH")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download pinned wheels and pack the bundle")
    b.add_argument("--out", default=".bundle/sglang-0.5.17-py312.tar.xz")
    b.add_argument("--work", default=".bundle/work")
    b.add_argument("--python-version", default="3.12")
    b.add_argument("--max-mib", type=float, default=60.0)
    i = sub.add_parser("install", help="unpack on the target and verify the start-up imports")
    i.add_argument("--bundle", required=True)
    i.add_argument("--target", required=True)
    args = p.parse_args(argv)
    build(args) if args.cmd == "build" else install(args)


if __name__ == "__main__":
    main()
