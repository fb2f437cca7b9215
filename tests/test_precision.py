"""--precision: the auto rule (tested with an injected CPU on any machine), the bad-input paths, and
what extract records so that bf16 and fp32 states never meet silently."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from mlsm.core.device import cpu_flags, native_bf16, resolve_precision
from mlsm.core.errors import MLSMError
from tests.test_pipeline_e2e import SENTENCES, run

CPU = torch.device("cpu")
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
SAPPHIRE_RAPIDS = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
SKYLAKE = frozenset({"avx2", "avx512f"})
GRAVITON3 = frozenset({"asimd", "sve", "bf16"})


@pytest.mark.parametrize("flags, capability, native", [
    (ZEN4, "AVX512", True),
    (SAPPHIRE_RAPIDS, "AVX512", True),
    (SKYLAKE, "AVX512", False),  # AVX-512 without its bf16 extension: emulated
    (ZEN4, "AVX2", False),  # a torch build whose kernels do not use AVX-512 cannot use its bf16
    (frozenset(), "DEFAULT", False),
    (GRAVITON3, "SVE256", True),
    (frozenset({"asimd"}), "DEFAULT", False),
])
def test_auto_is_bf16_exactly_where_bf16_is_native(flags, capability, native):
    assert native_bf16(CPU, flags, capability) is native
    assert resolve_precision("auto", CPU, flags, capability) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", CPU, flags, capability) == "fp32"


def test_forced_bf16_without_native_support_works_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", CPU, SKYLAKE, "AVX512") == "bf16"
    assert "no native bfloat16" in caplog.text and "slower" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", CPU, ZEN4, "AVX512") == "bf16"
    assert caplog.text == ""
    with pytest.raises(MLSMError, match="precision"):
        resolve_precision("fp16", CPU)


def test_this_machine_is_read_from_its_cpu_flags():
    flags = cpu_flags()
    assert isinstance(flags, frozenset)
    assert native_bf16(CPU) == native_bf16(CPU, flags, torch.backends.cpu.get_cpu_capability())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    (root / "corpus.txt").write_text("\n\n".join("\n".join(SENTENCES[(i + j) % 6] for j in range(3)) for i in range(12)))
    return root


def _extract(root, out, precision):
    return run("extract", "--corpus", str(root / "corpus.txt"), "--out", str(root / out), "--layers", "6",
               "--max-tokens", "600", "--precision", precision, "--no-progress")


def test_extract_records_the_precision_used_and_refuses_a_mix(corpus, capsys):
    assert _extract(corpus, "fp32", "fp32") == 0
    man = json.loads((corpus / "fp32" / "manifest.json").read_text())
    assert man["params"]["precision"] == "fp32"
    assert _extract(corpus, "fp32", "bf16") == 2
    err = capsys.readouterr().err
    assert "precision" in err and "--force" in err
    assert _extract(corpus, "auto", "auto") == 0
    auto = json.loads((corpus / "auto" / "manifest.json").read_text())["params"]["precision"]
    assert auto == resolve_precision("auto", CPU)  # the resolved value, never "auto"


def test_bf16_states_are_the_fp32_states_to_bf16_accuracy(corpus):
    assert _extract(corpus, "fp32b", "fp32") == 0
    assert _extract(corpus, "bf16", "bf16") == 0
    a = np.stack(pd.read_parquet(corpus / "fp32b" / "shard-00000.parquet")["h6"].to_numpy()).astype(np.float32)
    b = np.stack(pd.read_parquet(corpus / "bf16" / "shard-00000.parquet")["h6"].to_numpy()).astype(np.float32)
    assert a.shape == b.shape
    assert not np.array_equal(a, b)  # the bf16 path really ran
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99, cos.min()
