"""Bad adapters against the real base model: each refused at registration with its
reason code, while another tenant's request keeps streaming and nothing else changes."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lorapool import AdapterPool, SamplingParams
from lorapool.errors import AdapterValidationError

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

Mutation = Callable[[Path], None]


def _tensors(edit: Callable[[dict[str, object]], None]) -> Mutation:
    def mutate(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, d / "adapter_model.safetensors")

    return mutate


def _config(**changes: object) -> Mutation:
    def mutate(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    return mutate


def _first(tensors: dict[str, object], part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


def _rename(old_part: str, new_part: str) -> Callable[[dict[str, object]], None]:
    def edit(t: dict[str, object]) -> None:
        key = _first(t, old_part)
        t[key.replace(old_part, new_part)] = t.pop(key)

    return edit


def _poison(t: dict[str, object]) -> None:
    key = _first(t, "lora_B")
    t[key] = t[key].clone()  # type: ignore[attr-defined]
    t[key][0, 0] = float("nan")  # type: ignore[index]


def _scale(t: dict[str, object]) -> None:
    key = _first(t, "lora_A")
    t[key] = t[key] * 1e7  # type: ignore[operator]


def _transpose(t: dict[str, object]) -> None:
    key = _first(t, "lora_A")
    t[key] = t[key].t().contiguous()  # type: ignore[attr-defined]


def _int8(t: dict[str, object]) -> None:
    key = _first(t, "lora_A")
    t[key] = t[key].to(torch.int8)  # type: ignore[attr-defined]


def _magnitude(t: dict[str, object]) -> None:
    key = _first(t, "lora_B")
    out_features = t[key].shape[0]  # type: ignore[attr-defined]
    t[key.replace(".lora_B.weight", ".lora_magnitude_vector")] = torch.ones(out_features)


def _unpair(t: dict[str, object]) -> None:
    del t[_first(t, "lora_B")]


def _pickle(d: Path) -> None:
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")


def _truncate(d: Path) -> None:
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _bad_header(d: Path) -> None:
    f = d / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8
    f.write_bytes(bytes(data))


BAD: dict[str, tuple[Mutation, set[str]]] = {
    "pickle": (_pickle, {"pickle_weights"}),
    "truncated": (_truncate, {"truncated", "bad_header"}),
    "garbled-header": (_bad_header, {"bad_header"}),
    # refused for its missing magnitudes, or as DoRA by a backend that does not serve it
    "dora-without-magnitudes": (_config(use_dora=True), {"unpaired_magnitude", "unsupported_dora"}),
    "magnitude-without-dora": (_tensors(_magnitude), {"magnitude_without_dora"}),
    "bias": (_config(bias="all"), {"unsupported_bias"}),
    "modules-to-save": (_config(modules_to_save=["lm_head"]), {"unsupported_modules_to_save"}),
    "peft-type": (_config(peft_type="IA3"), {"unsupported_peft_type"}),
    "rank-too-high": (_config(r=64), {"unsupported_rank", "rank_mismatch"}),
    "rank-mismatch": (_config(r=4), {"rank_mismatch", "shape_mismatch"}),
    "other-base": (
        _config(base_model_name_or_path="meta-llama/Meta-Llama-3-8B"),
        {"base_mismatch"},
    ),
    "unknown-module": (
        _tensors(_rename("q_proj", "qq_proj")),
        {"unknown_module", "unsupported_target", "unpaired_lora"},
    ),
    "layer-99": (
        _tensors(_rename("layers.0.", "layers.99.")),
        {"layer_out_of_range", "unpaired_lora"},
    ),
    "transposed": (_tensors(_transpose), {"shape_mismatch", "rank_mismatch"}),
    "unpaired": (_tensors(_unpair), {"unpaired_lora"}),
    "int8": (_tensors(_int8), {"bad_dtype"}),
    "nan": (_tensors(_poison), {"non_finite"}),
    "huge-norm": (_tensors(_scale), {"norm_anomaly"}),
}


async def test_bad_adapters_are_refused_and_nothing_else_changes(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=3, max_rank=32, max_batch=4, max_seq_len=256)
    async with AdapterPool(backend) as pool:
        await pool.register("other/good", str(adapters["r8-attn"]), tenant="other")
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        chunks: list[str] = []

        async def stream() -> int:
            n = 0
            async for chunk in pool.generate(
                "Write a long story.", adapter="other/good", tenant="other", params=params
            ):
                chunks.append(chunk.text)
                n += len(chunk.token_ids)
            return n

        running = asyncio.create_task(stream())
        while not chunks:
            await asyncio.sleep(0.01)
        registered = [a.adapter_id for a in pool.list_adapters(tenant="other")]
        resident = pool.store.resident
        for name, (mutate, reasons) in BAD.items():
            d = tmp_path / name
            shutil.copytree(adapters["r8-attn"], d)
            mutate(d)
            with pytest.raises(AdapterValidationError) as err:
                await pool.register(f"evil/{name}", str(d), tenant="evil")
            assert err.value.reason in reasons, (name, err.value.reason, str(err.value))
            assert pool.list_adapters(tenant="evil") == []
            assert [a.adapter_id for a in pool.list_adapters(tenant="other")] == registered
            assert pool.store.resident == resident
        assert not running.done(), "make the other tenant's request longer"
        assert await running == 64

        # force accepts what is only an anomaly, never a broken file.
        d = tmp_path / "forced"
        shutil.copytree(adapters["r8-attn"], d)
        _tensors(_scale)(d)
        info = await pool.register("evil/forced", str(d), tenant="evil", force=True)
        assert info.adapter_id == "evil/forced"
