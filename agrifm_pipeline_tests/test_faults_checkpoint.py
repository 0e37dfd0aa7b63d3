"""A checkpoint file the encoder cannot use is named for what it is (issue 17, item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agrifm_pipeline.checkpoint import read_checkpoint, resolve_checkpoint
from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.model import load_encoder
from agrifm_pipeline.model.checks import checkpoint_problem, validate_checkpoint
from agrifm_pipeline.settings import load_settings

from .pipeline_helpers import TINY

HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>login</body></html>\n"
TORCH_ADVICE = ("weights_only=False", "weights_only` set to `False", "unsafe", "arbitrary code")


def _problem(path: Path, min_bytes: int = 1000) -> str | None:
    settings = load_settings({}, ckpt_min_bytes=min_bytes, auto_download=False)
    return checkpoint_problem(resolve_checkpoint(path, settings), settings)


def test_html_page_is_called_an_html_page(tmp_path: Path) -> None:
    """It used to say "needs unsafe pickle loading" and quote torch's weights_only=False advice."""
    page = tmp_path / "AgriFM.pth"
    page.write_bytes(HTML * 50)
    for call in (read_checkpoint, load_encoder):
        with pytest.raises(CheckpointError) as err:
            call(page)
        msg = str(err.value)
        assert "is an HTML page" in msg and "<!DOCTYPE html>" in msg and str(page) in msg
        assert not any(phrase in msg for phrase in TORCH_ADVICE), msg
    problem = _problem(page)
    assert problem is not None and "is an HTML page" in problem
    assert not any(phrase in problem for phrase in TORCH_ADVICE)


def test_a_page_with_a_bom_and_blank_lines_is_still_a_page(tmp_path: Path) -> None:
    page = tmp_path / "w.pth"
    page.write_bytes(b"\xef\xbb\xbf\n\n  <html lang='en'><body>404</body></html>")
    with pytest.raises(CheckpointError, match="is an HTML page"):
        read_checkpoint(page)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"", "an empty file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 9\n", "Git LFS"),
        (b'{"error": "not found"}', "JSON"),
    ],
)
def test_other_files_that_are_not_weights_are_named(
    tmp_path: Path, content: bytes, named: str
) -> None:
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=named):
        read_checkpoint(path)


class _Custom:
    """Loading this would need unpickling an arbitrary class."""


def test_pickled_objects_are_refused_without_torchs_advice(tmp_path: Path) -> None:
    path = tmp_path / "objects.pth"
    torch.save({"obj": _Custom(), "w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    msg = str(err.value)
    assert "holds more than tensors" in msg and "_Custom" in msg and "weights_only=True" in msg
    assert not any(phrase in msg for phrase in TORCH_ADVICE), msg


def test_truncated_checkpoint_is_called_damaged(tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    path.write_bytes(TINY.read_bytes()[: TINY.stat().st_size // 2])
    problem = _problem(path)
    assert problem is not None and "truncated or damaged" in problem


def test_the_reference_checkpoint_is_usable() -> None:
    assert _problem(TINY) is None
    settings = load_settings({})
    assert checkpoint_problem(resolve_checkpoint("untrained:0", settings), settings) is None


def test_smaller_than_the_minimum_size(tmp_path: Path) -> None:
    problem = _problem(TINY, min_bytes=TINY.stat().st_size + 1)
    assert problem is not None and "RS_EMBED_AGRIFM_CKPT_MIN_BYTES" in problem
    assert f"{TINY.stat().st_size} bytes" in problem


def test_other_tensors_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other_model.pth"
    torch.save({f"head.{i}.weight": torch.zeros(300, 300) for i in range(3)}, path)
    problem = _problem(path)
    assert problem is not None and "no AgriFM S2 encoder tensors" in problem


def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    state = torch.load(TINY, weights_only=True)
    key = next(k for k in state if k.endswith("mlp.fc1.weight"))
    state[key] = state[key][:, :-1].clone()
    path = tmp_path / "reshaped.pth"
    torch.save(state, path)
    problem = _problem(path)
    assert problem is not None and "shape mismatch" in problem and "mlp.fc1.weight" in problem
    settings = load_settings({}, ckpt_min_bytes=0)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        validate_checkpoint(resolve_checkpoint(path, settings), settings)
