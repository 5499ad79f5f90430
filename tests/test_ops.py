"""ldm.ops: the one settings object, its context manager and configure(), the one fast-path
predicate, and that each setting really routes the computation where it says."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ldm.ops
from ldm.ops import SETTINGS, attention, attention_ops, capability, config, configure, fast_path_allowed, settings

DEFAULTS = {"attention": "auto", "attention_slice_size": None, "conv_prepack": True, "onednn_linear": True}


@pytest.fixture(autouse=True)
def restore_settings():
    with settings():
        yield


def test_defaults_and_public_names():
    assert SETTINGS.as_dict() == DEFAULTS
    for name in ("Conv2d", "Linear", "attention", "settings", "configure", "SETTINGS", "fast_path_allowed",
                 "release_file_pages", "release_mapped_range"):
        assert name in ldm.ops.__all__ and hasattr(ldm.ops, name)
    assert issubclass(ldm.ops.Conv2d, torch.nn.Conv2d) and issubclass(ldm.ops.Linear, torch.nn.Linear)


def test_settings_block_changes_and_restores():
    with settings(attention="sdpa", conv_prepack=False) as s:
        assert s is SETTINGS
        assert (SETTINGS.attention, SETTINGS.conv_prepack) == ("sdpa", False)
        assert SETTINGS.onednn_linear is True and SETTINGS.attention_slice_size is None  # untouched
    assert SETTINGS.as_dict() == DEFAULTS


def test_settings_restores_when_the_block_raises():
    with pytest.raises(KeyError):
        with settings(attention_slice_size=8, onednn_linear=False):
            assert SETTINGS.attention_slice_size == 8
            raise KeyError("boom")
    assert SETTINGS.as_dict() == DEFAULTS


def test_settings_nest_and_undo_configure_inside():
    with settings(attention="sdpa"):
        with settings(attention="auto", attention_slice_size=3):
            assert (SETTINGS.attention, SETTINGS.attention_slice_size) == ("auto", 3)
            configure(conv_prepack=False)
        assert SETTINGS.as_dict() == dict(DEFAULTS, attention="sdpa")
    assert SETTINGS.as_dict() == DEFAULTS


def test_configure_persists_and_returns_previous_values():
    previous = configure(attention_slice_size=16, conv_prepack=False)
    assert previous == {"attention_slice_size": None, "conv_prepack": True}
    assert (SETTINGS.attention_slice_size, SETTINGS.conv_prepack) == (16, False)
    configure(**previous)
    assert SETTINGS.as_dict() == DEFAULTS


@pytest.mark.parametrize("changes,message", [
    ({"attention": "flash"}, r"attention backend must be one of \('auto', 'sdpa'\)"),
    ({"attention": None}, "attention backend"),
    ({"attention_slice_size": 0}, "slice size must be None or an integer >= 1"),
    ({"attention_slice_size": -4}, "slice size"),
    ({"attention_slice_size": 2.5}, "slice size"),
    ({"attention_slice_size": True}, "slice size"),
    ({"attention_slice_size": "8"}, "slice size"),
    ({"conv_prepack": "no"}, "conv_prepack must be True or False"),
    ({"conv_prepack": 1}, "conv_prepack must be True or False"),
    ({"onednn_linear": None}, "onednn_linear must be True or False"),
    ({"slice_size": 4}, "unknown ldm.ops setting 'slice_size'; the settings are attention, attention_slice_size"),
])
def test_invalid_values_are_rejected_and_change_nothing(changes, message):
    with pytest.raises(ValueError, match=message):
        configure(**{"attention_slice_size": 2, "conv_prepack": False, **changes})  # valid ones in the call: not applied
    with pytest.raises(ValueError, match=message):
        with settings(**{"onednn_linear": False, **changes}):
            pass
    assert SETTINGS.as_dict() == DEFAULTS


def test_settings_object_is_read_only():
    with pytest.raises(AttributeError, match="ldm.ops.settings"):
        SETTINGS.attention = "sdpa"
    assert SETTINGS.attention == "auto"


def test_slice_size_is_stored_as_int():
    import numpy as np

    configure(attention_slice_size=np.int64(5))
    assert type(SETTINGS.attention_slice_size) is int and SETTINGS.attention_slice_size == 5


# -- the predicate -----------------------------------------------------------------------------------

def test_fast_path_allowed():
    x, w = torch.randn(2, 3), torch.randn(3, 3, requires_grad=True)
    assert fast_path_allowed(x) and fast_path_allowed(x, None)
    assert not fast_path_allowed(x, w)  # a gradient would be recorded for w
    with torch.no_grad():
        assert fast_path_allowed(x, w, None)
        assert not fast_path_allowed(x, torch.empty(3, device="meta"))  # not all on the CPU
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fast_path_allowed(x)


def test_fast_path_not_allowed_while_compiling(monkeypatch):
    monkeypatch.setattr(config, "is_compiling", lambda: True)
    with torch.no_grad():
        assert not fast_path_allowed(torch.randn(2))


# -- each setting routes where it says ---------------------------------------------------------------

@pytest.fixture
def routes(monkeypatch):
    """Spies on SDPA and on the blocked form (the latter a stub, so no oneDNN is needed), with the
    capabilities the blocked form needs switched on."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append(("sdpa", q.shape[-2])) or sdpa(q, *a, **kw))
    monkeypatch.setattr(attention_ops, "_blocked_attention",
                        lambda q, k, v, scale: calls.append(("blocked", q.shape[-2])) or torch.zeros_like(q))
    monkeypatch.setattr(capability, "ONEDNN_LINEAR", True)
    monkeypatch.setattr(capability, "cpu_has_fast_bf16_matmul", lambda: True)
    return calls


def test_attention_setting_routes_to_sdpa(routes):
    q = torch.randn(1, 2, 256, 8)  # 65536 scores a head: large enough for the blocked form
    with torch.no_grad():
        attention(q, q, q)
        assert routes == [("blocked", 256)]
        routes.clear()
        with settings(attention="sdpa"):
            out = attention(q, q, q)
        assert routes == [("sdpa", 256)]
        assert torch.allclose(out, F.scaled_dot_product_attention(q, q, q), atol=1e-6)
        routes.clear()
        attention(q, q, q)  # back to auto after the block
        assert routes == [("blocked", 256)]


def test_attention_slice_size_setting_slices_the_queries(routes):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))  # small: SDPA
    full = attention(q, k, v)
    routes.clear()
    with settings(attention_slice_size=4):
        sliced = attention(q, k, v)
    assert routes == [("sdpa", 4), ("sdpa", 4), ("sdpa", 2)]
    assert torch.allclose(sliced, full, atol=1e-6)


def _spy(monkeypatch, owner, name, calls, tag):
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(tag) or real(*a, **kw))


def test_conv_prepack_false_gives_f_conv2d(monkeypatch):
    calls = []
    _spy(monkeypatch, F, "conv2d", calls, "F.conv2d")
    conv = ldm.ops.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
        calls.clear()
        if capability.ONEDNN_CONV:
            _spy(monkeypatch, capability, "onednn_conv_op", calls, "oneDNN")
            packed = conv(x)
            assert calls == ["oneDNN"] and conv._packed is not None
            assert torch.allclose(packed, ref, atol=1e-5)
            calls.clear()
        with settings(conv_prepack=False):
            out = conv(x)
    assert calls == ["F.conv2d"] and conv._packed is None
    assert torch.equal(out, ref)


def test_onednn_linear_false_gives_f_linear(monkeypatch):
    calls = []
    _spy(monkeypatch, F, "linear", calls, "F.linear")
    lin = ldm.ops.Linear(8, 5).requires_grad_(False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = F.linear(x, lin.weight, lin.bias)
        calls.clear()
        if capability.ONEDNN_LINEAR:
            _spy(monkeypatch, capability, "onednn_linear_op", calls, "oneDNN")
            assert torch.allclose(lin(x), ref, atol=1e-6)
            assert calls == ["oneDNN"]
            calls.clear()
        with settings(onednn_linear=False):
            out = lin(x)
    assert calls == ["F.linear"]
    assert torch.equal(out, ref)


def test_model_files_use_the_ops_layers():
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules import util
    from ldm.modules.diffusionmodules.model import AttnBlock

    assert util.Conv2d is ldm.ops.Conv2d and util.Linear is ldm.ops.Linear
    assert isinstance(util.conv_nd(2, 3, 4, 1), ldm.ops.Conv2d) and isinstance(util.linear(3, 4), ldm.ops.Linear)
    assert isinstance(CrossAttention(8, heads=2, dim_head=4).to_q, ldm.ops.Linear)
    assert isinstance(AttnBlock(32).q, ldm.ops.Conv2d)
