#!/usr/bin/env bash
# GPU smoke test of the trainer (issue 20), under 10 minutes on one GPU. Not run by CI (no GPU).
#
#   bash scripts/gpu_smoke.sh [WORK_DIR]        # from the repository root, in the project's venv
#
# 1. builds a synthetic dataset offline (tools.synth scenes -> pipeline, 128 px and 96 px chips,
#    about 3,000 samples: less than base_gpu's batch, hence allow_small_data for this smoke),
# 2. base at 128 px, bf16, ZeRO-2, ~30 optimizer steps: prints samples/s, model TFLOP/s, MFU and
#    the data-wait share from metrics.jsonl,
# 3. a two-stage tiny run under ZeRO-3 that saves, stops (stop_at_step) and resumes: the resumed
#    losses must equal an uninterrupted run's,
# 4. the tokeniser: Conv3d vs patchify + Linear, bf16, forward + backward timing,
# 5. export of the run and a strict reload of the weights.
# Figures go to WORK_DIR/gpu_smoke.json and are printed; copy them to benchmarks/RESULTS_gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/gpu_smoke}
PY=${PYTHON:-python}
mkdir -p "$WORK"
command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: this script needs a CUDA GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== 1. dataset (synthetic scenes, offline)"
if [ ! -f "$WORK/ds/manifest.json" ]; then
  $PY - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
from tools.synth import generate_scenes
from pipeline.build_shards import main as build
work = Path(sys.argv[1])
catalog = generate_scenes(work / "scenes", 12, 2048, 0)
cfg = work / "build.yaml"
cfg.write_text(json.dumps({"tiling": [{"size": 96, "gsd": 10}, {"size": 128, "gsd": 10}],
                           "quality": {"max_invalid": 1.0, "max_cloud": 1.0}}))
sys.exit(build(["--catalog", str(catalog), "--bbox=-180,-85,180,85", "--max-cloud", "100",
                "--config", str(cfg), "--output", str(work / "ds")]))
EOF
fi

echo "== 2. base, 128 px, bf16, ZeRO-2, 30 steps"
SET=(--set "manifest=$WORK/ds/manifest.json" --set "output_dir=$WORK/runs" --set name=base128
     --set stages.0.img_size=128 --set stages.0.dataset=s128_g10m --set stop_at_step=30
     --set log_every=5 --set checkpoint_every=1000 --set image_every=1000
     --set allow_small_data=true)  # ~3,000 chips < base_gpu's batch of 4096: a 30-step smoke, not a run
timeout 420 deepspeed --num_gpus 1 training/pretrain.py --config base_gpu "${SET[@]}"
$PY - "$WORK/runs/base128/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if '"loss"' in x]
last = rows[-1]
print(json.dumps({k: last.get(k) for k in ("step", "samples_per_s", "tokens_per_s", "model_tflops", "mfu",
                                           "step_time_s", "data_wait_s")}, indent=1))
share = last.get("data_wait_s", 0) / max(last.get("step_time_s", 1e-9), 1e-9)
print(f"data-wait share of step time: {share:.1%} (target < 10 %)")
EOF

echo "== 3. two stages under ZeRO-3: save, stop, resume"
T=(--config tiny_cpu --set "manifest=$WORK/ds/manifest.json" --set "output_dir=$WORK/runs"
   --set deepspeed_config=ds_zero3.json --set bf16=true --set checkpoint_every=5)
deepspeed --num_gpus 1 training/pretrain.py "${T[@]}" --set name=z3_ref
deepspeed --num_gpus 1 training/pretrain.py "${T[@]}" --set name=z3 --set stop_at_step=7
deepspeed --num_gpus 1 training/pretrain.py "${T[@]}" --set name=z3 --resume
$PY - "$WORK/runs" <<'EOF'
import json, sys
from pathlib import Path
def losses(name):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(sys.argv[1]) / name / "metrics.jsonl").open())
            if "loss" in r}
ref, got = losses("z3_ref"), losses("z3")
same = all(abs(ref[s] - got[s]) <= 1e-6 * max(1, abs(ref[s])) for s in ref if s in got)
print(f"resume exact: {same} ({len(ref)} logged steps)")
sys.exit(0 if same else 1)
EOF

echo "== 4. tokeniser: Conv3d vs patchify + Linear (bf16, base, batch 64 at 128 px)"
$PY - <<'EOF'
import time, torch, torch.nn.functional as F
from training.models.spectral_mae import build_model
m = build_model("base", img_size=128).cuda()
proj = m.patch_embed.proj
x = torch.randn(64, 1, 12, 128, 128, device="cuda", requires_grad=True)
def conv():
    return F.conv3d(x, proj.weight, proj.bias, stride=proj.stride)
def linear():
    return proj(x)
for name, fn in (("conv3d", conv), ("linear", linear)):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            fn().float().sum().backward()
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(20):
            fn().float().sum().backward()
        torch.cuda.synchronize()
    print(f"{name}: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms forward + backward")
EOF

echo "== 5. export and strict reload"
OUT=$($PY -m training.export "$WORK/runs/z3" | tail -1)
$PY - "$OUT" <<'EOF'
import sys
from training.export import load_exported
load_exported(sys.argv[1])  # strict load of every key
print("export reloaded strictly:", sys.argv[1])
EOF
echo "gpu smoke: done"
