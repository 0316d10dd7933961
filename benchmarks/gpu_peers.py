"""The PyTorch peers (Liger, Cut Cross-Entropy, torch.compile, eager) on this GPU, for comparison
with a jxent-bench run on the same machine in the same call.

Cases as in docs/benchmarks.md (the targets in docs/architecture.md): bf16 logits 8192x128256, 32768x32000, 4096x256000 (integer labels; forward,
forward+backward); linear 8192x2304 -> 256000 (forward+backward). CUDA events, median of 20 (10
for linear), 3 warm-up calls; peak extra memory of forward+backward.

Liger and CCE are pure-Python wheels; the GPU machine has torch and triton but no network. Fetch
them here once (into the ignored .whl/ folder) and carry them:

  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
      --implementation cp --platform manylinux2014_x86_64 -d .whl liger-kernel cut-cross-entropy

then, in one device call (carry: [".whl"]):

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site python benchmarks/gpu_peers.py > $OUT/peers.jsonl
  PYTHONPATH=. python -m jxent.bench.cli --llm --json $OUT/llm.json
  PYTHONPATH=. python -m jxent.bench.cli --shape 8192,2304,256000 --dtype bfloat16 \\
      --modes forward_and_vjp --json $OUT/linear.json
"""
import json, statistics
import torch, torch.nn.functional as F

def emit(**kw):
  print(json.dumps(kw), flush=True)

def bench(fn, reps=20, warm=3):
  for _ in range(warm):
    fn()
  torch.cuda.synchronize()
  ts = []
  for _ in range(reps):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
  return statistics.median(ts)

def peak_extra_mb(fn):
  torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
  fn(); torch.cuda.synchronize()
  return (torch.cuda.max_memory_allocated() - base) / 1e6

def run(name, f, args, reps, **case):
  """Times forward (no grad) and forward+backward of ``f(*args)``; the float args get gradients."""
  def fwd():
    with torch.no_grad():
      return f(*args)
  def fb():
    leaves = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
    f(*leaves).backward()
  try:
    emit(case=name, **case, fwd_ms=bench(fwd, reps), fwdbwd_ms=bench(fb, reps),
         fwdbwd_peak_extra_MB=peak_extra_mb(fb))
  except Exception as e:  # noqa: BLE001  (a peer that fails is recorded, not fatal)
    emit(case=name, **case, error=repr(e)[:300])

emit(case="device", kind=torch.cuda.get_device_name(), torch=torch.__version__)
peers = {}
try:
  from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
  peers["liger"] = (LigerCrossEntropyLoss(), LigerFusedLinearCrossEntropyLoss())
except Exception as e:  # noqa: BLE001
  emit(case="liger_import", error=repr(e)[:300])
try:
  from cut_cross_entropy import linear_cross_entropy
  peers["cce"] = linear_cross_entropy
except Exception as e:  # noqa: BLE001
  emit(case="cce_import", error=repr(e)[:300])

dev = "cuda"
for n, v in ((8192, 128256), (32768, 32000), (4096, 256000)):
  g = torch.Generator(device=dev).manual_seed(0)
  x = (torch.randn(n, v, device=dev, generator=g) * 3).to(torch.bfloat16)
  t = torch.randint(0, v, (n,), device=dev, generator=g)
  cands = {"torch_eager": lambda x, t: F.cross_entropy(x.float(), t),
           "torch_compile": torch.compile(lambda x, t: F.cross_entropy(x.float(), t))}
  if "liger" in peers:
    cands["liger_ce"] = peers["liger"][0]
  for name, f in cands.items():
    run(name, f, (x, t), 20, n=n, v=v, dtype="bfloat16")
  del x, t
  torch.cuda.empty_cache()

n, d, v = 8192, 2304, 256000
g = torch.Generator(device=dev).manual_seed(1)
h = torch.randn(n, d, device=dev, generator=g).to(torch.bfloat16)
w = (torch.randn(v, d, device=dev, generator=g) * 0.02).to(torch.bfloat16)
t = torch.randint(0, v, (n,), device=dev, generator=g)
lin = {"linear_torch_eager": lambda h, w, t: F.cross_entropy((h @ w.T).float(), t),
       "linear_torch_compile": torch.compile(lambda h, w, t: F.cross_entropy((h @ w.T).float(), t)),
       "matmul_only": lambda h, w, t: (h @ w.T).float().mean()}
if "liger" in peers:
  lin["liger_flce"] = lambda h, w, t: peers["liger"][1](w, h, t)
if "cce" in peers:
  lin["cce"] = peers["cce"]
for name, f in lin.items():
  run(name, f, (h, w, t), 10, n=n, d=d, v=v, dtype="bfloat16")
