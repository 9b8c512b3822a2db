"""`--kv SPEC` parsing: canonical round trip, and bad specs name the value and the allowed forms."""
import pytest

from leanlm.config import EngineConfig
from leanlm.kv.spec import KVSpec


@pytest.mark.parametrize("text, canonical", [
    ("fp16", "fp16"), ("BF16", "bf16"), ("fp32", "fp32"), ("fp8:e4m3", "fp8:e4m3"), ("fp8:e5m2", "fp8:e5m2"),
    ("kivi:4", "kivi:4"), ("kivi:int2:g32", "kivi:2:g32"), ("kivi:8:g16:r16", "kivi:8:g16"),
    ("kivi:4:r32", "kivi:4:g32"), ("bfp:8", "bfp:8:b16"), ("bfp:16:reorder", "bfp:16:b16:reorder"),
    ("bfp:4:b8:reorder", "bfp:4:b8:reorder"), ("kivi:3", "kivi:3"), ("kivi:4:g64:v3:c64:rotate", "kivi:4:g64:v3:c64:rotate"),
    ("kivi:2:v2", "kivi:2"), ("kivi:int3:rotate:g32", "kivi:3:g32:rotate"), ("xquant:4", "xquant:4:g32"),
    ("xquant:int2:g128:cl", "xquant:2:g128:cl"), ("xquant:3:cl", "xquant:3:g32:cl"),
    ("kivi:4:ktok:rotate", "kivi:4:rotate:ktok"), ("kivi:4:g64:knorm", "kivi:4:g64:knorm"),
])
def test_round_trip(text, canonical):
    spec = KVSpec.parse(text)
    assert str(spec) == canonical
    assert KVSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["fp4", "fp8", "fp8:e3m4", "kivi", "kivi:5", "kivi:int16", "kivi:4:v5", "kivi:4:c0", "kivi:4:rotate:rotate",
                                 "xquant", "xquant:5", "xquant:4:g0", "xquant:4:cl:cl", "xquant:4:r16", "kivi:4:g0",
                                 "kivi:4:g16:r24", "kivi:4:x", "kivi:4:g16:g16", "bfp:1", "bfp:17",
                                 "bfp:8:reorder:reorder", "bfp:8:c4", "fp16:g16", ""])
def test_bad_specs_name_the_value_and_the_allowed_forms(bad):
    with pytest.raises(ValueError) as e:
        KVSpec.parse(bad)
    assert repr(bad) in str(e.value) and "kivi:BITS[:gG][:rR]" in str(e.value) and "fp8:e4m3" in str(e.value)


def test_engine_config_block_size_follows_the_kivi_group():
    assert EngineConfig(kv="kivi:4:g32").block_size == 32
    assert EngineConfig(kv="kivi:4").block_size == 16
    assert EngineConfig(kv="kivi:2", block_size=8).block_size == 8
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(kv="kivi:4:g32", block_size=16)
    with pytest.raises(ValueError, match="'kivi:5'"):
        EngineConfig(kv="kivi:5")
