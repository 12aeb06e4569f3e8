"""The library versions the paper's 2024 evaluation ran, as independent references for tests.

``scripts/setup.sh`` installs them with ``pip install --no-deps --target`` into
``<venv>/reference/<name>-<version>``; they are never imported by the project, and here only in a
subprocess (two torchmetrics cannot share one interpreter).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REFERENCE_DIR = Path(sys.prefix) / "reference"
TORCHMETRICS_2024 = "torchmetrics-1.4.1"  # the last release whose SSIM map was border-cropped (1.4.2 changed it)


def reference_path(name: str) -> Path:
    path = REFERENCE_DIR / name
    if not path.is_dir():
        raise RuntimeError(f"{path} is missing: run `bash scripts/setup.sh`, which installs the reference libraries "
                           "the tests compare the paper protocol with.")
    return path


def ms_ssim_torchmetrics_2024(pred: np.ndarray, target: np.ndarray) -> list[float]:
    """Per-image MS-SSIM (data range 1, torchmetrics' defaults) of (N, C, H, W) float32 maps, computed
    by torchmetrics 1.4.1 itself in a subprocess."""
    path = reference_path(TORCHMETRICS_2024)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "pred.npy", pred.astype(np.float32))
        np.save(Path(tmp) / "target.npy", target.astype(np.float32))
        code = (
            "import json, sys, numpy as np, torch, torchmetrics\n"
            f"assert torchmetrics.__version__ == '{TORCHMETRICS_2024.split('-')[1]}', torchmetrics.__file__\n"
            "from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim\n"
            "p = torch.from_numpy(np.load(sys.argv[1])); t = torch.from_numpy(np.load(sys.argv[2]))\n"
            "print(json.dumps(ms_ssim(p, t, data_range=1.0, reduction='none').tolist()))\n"
        )
        result = subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "pred.npy"), str(Path(tmp) / "target.npy")],
                                env={"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
