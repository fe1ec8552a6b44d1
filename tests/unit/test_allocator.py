"""The allocator set-up: after it, a training step reuses freed memory instead of faulting in new pages."""

import subprocess
import sys

import pytest

STEPS = 300
FAULTS_PER_STEP = """
import resource, sys, torch, torch.nn.functional as F
from torch import nn
from daemon.service.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
optimizer = torch.optim.Adam(model.parameters())
images, labels = torch.rand(100, 784), torch.randint(0, 10, (100,))
def steps(n):
    for _ in range(n):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
steps(20)  # past the first steps' one-off allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps({steps})
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / {steps})
""".replace("{steps}", str(STEPS))


def faults_per_step(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True)
    return float(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_training_step_reuses_freed_memory():
    tuned = faults_per_step("tuned")
    untuned = faults_per_step("untuned")

    assert tuned < 5, f"{tuned} page faults a step"
    assert untuned > 10 * max(tuned, 1)  # what it saves: glibc's defaults fault at every step
