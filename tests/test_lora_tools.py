"""LoRA tools (inspect, bake, resize, merge, extract): the numbers users rely on, on sd-scripts' and LyCORIS's own files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_trainer.cli import main
from lora_trainer.errors import UserError
from lora_trainer.networks.apply import Strength
from lora_trainer.networks.files import read_network
from lora_trainer.networks.tools.bake import bake
from lora_trainer.networks.tools.inspect import inspect_network
from reference import REFERENCE, TINY_KOHYA_CHECKPOINT

KOHYA_LORA = REFERENCE / "kohya-fixtures" / "lora-baseline" / "tinylora.safetensors"
KOHYA_LOHA = REFERENCE / "kohya-fixtures" / "lora-lycoris" / "tiny_loha.safetensors"
LYCORIS_LORA = REFERENCE / "network-fixtures" / "lora.safetensors"
LYCORIS_SDXL_LORA = REFERENCE / "network-fixtures" / "lora_sdxl.safetensors"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # thousands of tiny SVDs and matmuls: on the shared 2-core machine, threading them costs 50× more than it saves
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))


# --- inspect -------------------------------------------------------------------------------------------------


def test_inspect_reports_what_sd_scripts_wrote_and_checks_its_hash():
    summary = inspect_network(KOHYA_LORA)
    assert summary.algorithms == {"lora": 204}
    assert summary.base_model == "SD1" and summary.base_model_source == "ss_base_model_version"
    assert (summary.network_module, summary.dim, summary.alpha) == ("networks.lora", "4", "4.0")
    blocks = {b.block: b for b in summary.blocks}
    assert blocks["TE"].modules == 12 and blocks["TE"].ranks == [4] and blocks["TE"].alphas == [4.0]
    # SD1 attention blocks in block-weight labels: IN01/02/04/05/07/08, MID, OUT03…OUT11
    assert [b.block for b in summary.blocks] == ["TE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
                                                  *(f"OUT{i:02d}" for i in range(3, 12))]
    assert summary.top_tags[0] == ("shapes", 16)
    assert summary.hash_matches is True
    assert summary.autov2 == summary.sha256[:10]
    assert "ss_tag_frequency" not in summary.metadata and summary.metadata["modelspec.title"] == "tinylora"


def test_inspect_says_when_the_tensors_changed_after_saving(tmp_path):
    tensors = load_file(KOHYA_LORA)
    with safe_open(str(KOHYA_LORA), "pt") as handle:
        metadata = handle.metadata()
    first = next(iter(tensors))
    tensors[first] = tensors[first] * 2
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata)
    summary = inspect_network(edited)
    assert summary.hash_matches is False
    assert any("MISMATCH" in line for line in summary.lines())


def test_inspect_reads_sdxl_from_metadata_and_names_both_text_encoders():
    summary = inspect_network(LYCORIS_SDXL_LORA)
    assert summary.base_model == "SDXL"
    labels = [b.block for b in summary.blocks]
    assert labels[:2] == ["TE1", "TE2"] and "MID" in labels


def test_inspect_command_prints_json(capsys):
    assert main(["lora", "inspect", str(KOHYA_LOHA), "--json", "--tags", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["algorithms"] == {"loha": 206}
    assert data["network_args"]["algo"] == "loha"
    assert len(data["top_tags"]) == 3


def test_inspect_command_prints_a_short_summary_and_every_key_with_all(capsys):
    """Every ss_* key by default (about 95 lines) buried what a user looks for."""
    assert main(["lora", "inspect", str(KOHYA_LORA)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  trained as: networks.lora, rank 4, alpha 4" in lines
    assert "  base model: SD1 (from ss_base_model_version), trained on tiny-sd15.safetensors" in lines
    assert "  training: 160 images (repeats counted), at 128x128, epoch 2 of 2, step 160 of 160" in lines
    assert "  trigger words: shapes, simple, flat colors" in lines
    assert any(line.startswith("  AutoV2 hash: ") for line in lines) and any("matches sshs_model_hash" in l for l in lines)
    assert lines[-1] == "  (--all: rank and alpha of each of the 17 blocks and the 84 other metadata keys)"
    assert len(lines) < 15 and not any("ss_session_id" in line for line in lines)
    assert main(["lora", "inspect", str(KOHYA_LORA), "--all"]) == 0
    everything = capsys.readouterr().out.splitlines()
    assert "  blocks:" in everything and "    ss_seed: 42" in everything and len(everything) > 100


def test_inspect_says_the_recommended_epoch_and_the_shape_where_the_metadata_holds_the_commands(tmp_path, capsys):
    """Our trainer records the epoch losses; sd-scripts writes "None" for a dim the command did not give."""
    with safe_open(str(KOHYA_LORA), "pt") as handle:
        metadata = handle.metadata()
    losses = {"epoch_training_loss": {"1": 0.2, "2": 0.1, "3": 0.098, "4": 0.097}, "epoch_validation_loss": {}}
    metadata.update({"ss_network_dim": "None", "ss_network_alpha": "1.0", "lora_trainer.losses": json.dumps(losses),
                     "modelspec.trigger_phrase": "zkshape"})
    save_file(load_file(KOHYA_LORA), str(tmp_path / "ours.safetensors"), metadata)
    assert main(["lora", "inspect", str(tmp_path / "ours.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("  trained as: networks.lora, rank 4, alpha 4 (its metadata says dim None, alpha 1.0: the training "
            "command's values)") in lines
    assert "  trigger words: zkshape" in lines
    assert any(line.startswith("  recommended epoch: 2 (") for line in lines)
    metadata.update({"ss_epoch": "4", "ss_num_epochs": "10"})  # an epoch file: its run up to its own epoch
    save_file(load_file(KOHYA_LORA), str(tmp_path / "epoch4.safetensors"), metadata)
    assert main(["lora", "inspect", str(tmp_path / "epoch4.safetensors")]) == 0
    assert any(line.startswith("  recommended epoch: 2 as of this file's epoch 4 of 10 (")
               for line in capsys.readouterr().out.splitlines())
    metadata.update({"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"})  # a dynamic resize wrote these
    save_file(load_file(KOHYA_LORA), str(tmp_path / "resized.safetensors"), metadata)
    assert main(["lora", "inspect", str(tmp_path / "resized.safetensors")]) == 0
    assert ("  trained as: networks.lora, rank 4, alpha 4 (its metadata says dim Dynamic: resized to a rank per "
            "module)") in capsys.readouterr().out.splitlines()


def test_inspect_refuses_a_checkpoint_and_a_missing_file(tmp_path, capsys):
    with pytest.raises(UserError, match="checkpoint, not a LoRA") as error:
        inspect_network(TINY_KOHYA_CHECKPOINT)
    assert str(error.value).endswith(f"run: python -m lora_trainer model inspect {TINY_KOHYA_CHECKPOINT}")
    assert main(["lora", "inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


# --- bake ----------------------------------------------------------------------------------------------------


def loha_delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW of a plain (non-Tucker) LoHa module written out from the formula: (α/r)·(w1a@w1b)⊙(w2a@w2b)."""
    t = {k: v.double() for k, v in tensors.items()}
    rank = t["hada_w1_b"].shape[0]
    return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (float(t["alpha"]) / rank)


@pytest.fixture(scope="module")
def baked_loha(tmp_path_factory):
    out = tmp_path_factory.mktemp("bake") / "baked.safetensors"
    progress = []
    result = bake(TINY_KOHYA_CHECKPOINT, [(KOHYA_LOHA, Strength(1.0))], out, progress=lambda *done: progress.append(done))
    assert progress == [(done, 206) for done in range(1, 207)]  # the bar of `lora bake`: module by module, to the end
    return out, result


def test_bake_adds_the_full_loha_delta_and_leaves_every_other_tensor_bit_identical(baked_loha):
    out, result = baked_loha
    base, baked = load_file(TINY_KOHYA_CHECKPOINT), load_file(out)
    assert baked.keys() == base.keys()
    untouched = [k for k in base if k not in result.changed_keys]
    assert len(result.changed_keys) == 206 and len(untouched) > 400
    for key in untouched:
        assert baked[key].dtype == base[key].dtype and torch.equal(baked[key], base[key]), key

    loha = read_network(KOHYA_LOHA).modules
    layers = {  # Kohya module → checkpoint tensor (Linear layers, so the formula needs no reshaping)
        "lora_te_text_model_encoder_layers_0_mlp_fc1": "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v":
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight",
    }
    for module, key in layers.items():
        expected = loha_delta(loha[module])
        applied = baked[key].double() - base[key].double()
        # not half of it (LyCORIS 4.1.3's merge applies α/r twice), not twice: the whole ΔW, up to fp16 rounding
        ratio = float((applied * expected).sum() / (expected * expected).sum())
        assert ratio == pytest.approx(1.0, abs=0.01), module
        ulp = base[key].double().abs().max() * 2**-10
        assert torch.allclose(applied, expected, atol=float(ulp)), module


def test_baked_checkpoint_loads_with_our_loader(baked_loha):
    from lora_trainer.models.checkpoint import load_checkpoint

    out, _ = baked_loha
    baked = load_checkpoint(out)
    stored = load_file(out)
    assert baked.config.label == "SD1"
    fc1 = baked.text_encoders[0].get_submodule("text_model.encoder.layers.0.mlp.fc1").weight
    assert torch.equal(fc1, stored["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"].float())


def test_bake_refuses_an_sdxl_lora_on_an_sd1_checkpoint_and_writes_nothing(tmp_path):
    out = tmp_path / "baked.safetensors"
    with pytest.raises(UserError, match="SDXL") as error:
        bake(TINY_KOHYA_CHECKPOINT, [(LYCORIS_SDXL_LORA, Strength(1.0))], out)
    assert "lora_sdxl" in str(error.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bake_command_takes_te_and_unet_strengths(tmp_path, capsys):
    two_layers = tmp_path / "two layers.safetensors"  # a space in the name, as on users' disks
    save_file({k: v for k, v in load_file(KOHYA_LOHA).items()
               if k.startswith(("lora_te_text_model_encoder_layers_0_mlp_fc1.", "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v."))},
              str(two_layers))
    out = tmp_path / "half.safetensors"
    assert main(["lora", "bake", "--model", str(TINY_KOHYA_CHECKPOINT), "--lora", f"{two_layers}:0:0.5", "--out", str(out)]) == 0
    assert "2 layers baked" in capsys.readouterr().out
    base, baked = load_file(TINY_KOHYA_CHECKPOINT), load_file(out)
    te_key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    unet_key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    assert torch.equal(baked[te_key], base[te_key])  # TE strength 0
    expected = 0.5 * loha_delta(read_network(KOHYA_LOHA).modules["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"])
    assert torch.allclose(baked[unet_key].double() - base[unet_key].double(), expected, atol=float(base[unet_key].abs().max()) * 2**-10)


def test_bake_reports_missing_files_by_name(tmp_path):
    with pytest.raises(UserError, match="missing.safetensors"):
        bake(TINY_KOHYA_CHECKPOINT, [(tmp_path / "missing.safetensors", Strength(1.0))], tmp_path / "out.safetensors")
    with pytest.raises(UserError, match="no-model.safetensors"):
        bake(tmp_path / "no-model.safetensors", [(KOHYA_LOHA, Strength(1.0))], tmp_path / "out.safetensors")


# --- resize --------------------------------------------------------------------------------------------------

from lora_trainer.networks.files import group_tensors  # noqa: E402
from lora_trainer.networks.registry import module_delta  # noqa: E402
from lora_trainer.networks.tools.resize import resize, resize_network  # noqa: E402
from lora_trainer.networks.tools.shared import lora_layer_shape  # noqa: E402


def deltas(network) -> dict[str, torch.Tensor]:
    """ΔW per module at strength 1, computed by the loader's own algorithm code."""
    return {name: module_delta(t, torch.empty(lora_layer_shape(t), device="meta")).weight for name, t in network.modules.items()}


@pytest.mark.parametrize("fixture", [LYCORIS_LORA, KOHYA_LORA])
def test_resize_to_its_own_rank_reproduces_every_delta(fixture, tmp_path):
    out = tmp_path / "same.safetensors"
    result = resize(fixture, out, rank=4, precision="fp32")
    before, after = deltas(read_network(fixture)), deltas(read_network(out))
    assert before.keys() == after.keys()
    for name in before:
        assert torch.allclose(after[name], before[name], atol=1e-5 * float(before[name].abs().max()) + 1e-7), name
    assert all(m.retained_fro == pytest.approx(1.0) for m in result.modules)
    alpha = read_network(fixture).modules[name]["alpha"]
    assert float(read_network(out).modules[name]["alpha"]) == pytest.approx(float(alpha))  # same rank, same α


SINGULAR_VALUES = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]


def lora_with_singular_values(values=SINGULAR_VALUES, alpha=4.0, shape=(16, 12)):
    """A Linear LoRA whose unscaled up @ down has exactly these singular values (rank 8, α 4: scale 0.5)."""
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], len(values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], len(values), generator=generator, dtype=torch.float64))
    up, down = u * torch.tensor(values, dtype=torch.float64), v.T
    return group_tensors({"lora_unet_layer.lora_up.weight": up.float(), "lora_unet_layer.lora_down.weight": down.float(),
                          "lora_unet_layer.alpha": torch.tensor(alpha)})


# Worked by hand from SINGULAR_VALUES (squares 64, 16, 4, 1, .25 …; total of squares 85.33, of values 15.94):
# sv_ratio 10 keeps values > 0.8 → 4; sv_fro 0.99 needs ≥ 98.01 % of the squares: 64+16+4 = 84 is 98.4 % → 3;
# sv_cumulative 0.9 needs ≥ 90 % of the sum: 8+4+2 = 14 is 87.8 %, +1 = 15 is 94.1 % → 4; a cap of 2 wins.
@pytest.mark.parametrize("method, parameter, cap, expected", [
    (None, None, 5, 5), ("sv_ratio", 10, 8, 4), ("sv_fro", 0.99, 8, 3), ("sv_cumulative", 0.9, 8, 4), ("sv_ratio", 10, 2, 2),
])
def test_resize_keeps_the_rank_each_method_asks_for_and_preserves_the_scale(method, parameter, cap, expected):
    result = resize_network(lora_with_singular_values(), cap, method=method, parameter=parameter)
    (module,) = result.modules
    assert module.new_rank == expected
    assert module.new_alpha == pytest.approx(0.5 * expected)  # old scale α/r = 4/8, times the new rank
    kept = torch.tensor(SINGULAR_VALUES[:expected])
    assert module.retained_fro == pytest.approx(float(kept.norm() / torch.tensor(SINGULAR_VALUES).norm()), rel=1e-5)
    resized = group_tensors(result.tensors).modules["lora_unet_layer"]
    delta = module_delta(resized, torch.empty(16, 12, device="meta")).weight
    # what is left is 0.5 × the dropped singular values: ‖ΔW_old − ΔW_new‖ = 0.5 · ‖dropped‖
    original = module_delta(lora_with_singular_values().modules["lora_unet_layer"], torch.empty(16, 12, device="meta")).weight
    dropped = torch.tensor(SINGULAR_VALUES[expected:])
    assert float((original - delta).norm()) == pytest.approx(0.5 * float(dropped.norm()), abs=1e-5)
    assert result.metadata["ss_network_dim"] == ("Dynamic" if method else str(cap))


def test_resize_above_a_modules_rank_keeps_its_rank_and_says_so():
    """Resizing rank 8 "up" to 12 cannot add anything: sd-scripts pads the file with zero directions; here each module
    keeps its own rank, ΔW unchanged, and the report says why the file is smaller than asked."""
    original = lora_with_singular_values()
    result = resize_network(original, 12)
    (module,) = result.modules
    assert module.new_rank == 8 and module.new_alpha == pytest.approx(4.0)
    resized = group_tensors(result.tensors).modules["lora_unet_layer"]
    assert resized["lora_down.weight"].shape == (8, 12)
    before = module_delta(original.modules["lora_unet_layer"], torch.empty(16, 12, device="meta")).weight
    after = module_delta(resized, torch.empty(16, 12, device="meta")).weight
    assert torch.allclose(after, before, atol=1e-5)
    assert result.metadata["ss_network_dim"] == "8"
    assert "1 module kept its rank (8), below the asked 12: a higher rank would hold only zeros" in result.lines()
    assert not any("kept" in line for line in resize_network(original, 8).lines())


def test_resize_keeps_the_embeddings_a_file_bundles():
    """A LoRA that brings its trigger word as a bundled embedding (bundle_emb.*) lost it silently when resized."""
    original = lora_with_singular_values()
    vectors = {"bundle_emb.zkstar.string_to_param.*": torch.randn(2, 768),
               "bundle_emb.zkchar.clip_l": torch.randn(1, 768), "bundle_emb.zkchar.clip_g": torch.randn(1, 1280)}
    with_embeddings = group_tensors({**{f"lora_unet_layer.{k}": t for k, t in original.modules["lora_unet_layer"].items()},
                                     **vectors})
    resized = resize_network(with_embeddings, 4).tensors
    assert all(torch.equal(resized[key], value) for key, value in vectors.items())
    assert group_tensors(resized).embeddings.keys() == {"zkstar", "zkchar"}


def test_resize_command_prints_retained_energy_and_writes_a_hashed_file(tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    assert main(["lora", "resize", str(KOHYA_LORA), "--out", str(out), "--new_rank", "2", "--verbose"]) == 0
    printed = capsys.readouterr().out
    assert "fro retained" in printed and "average Frobenius norm retained" in printed
    # sd-scripts' spelling (--model, --save_to), a module's line only when asked, as its --verbose
    assert main(["lora", "resize", "--model", str(KOHYA_LORA), "--save_to", str(tmp_path / "b.safetensors"),
                 "--new_rank", "2"]) == 0
    printed = capsys.readouterr().out
    assert "average Frobenius norm retained" in printed and "fro retained" not in printed
    summary = inspect_network(out)
    assert summary.hash_matches is True and summary.dim == "2" and {b.ranks[0] for b in summary.blocks} == {2}
    assert summary.metadata["ss_training_comment"].startswith("dimension is resized from 4 to 2")


def test_resize_refuses_other_algorithms_by_name(tmp_path):
    with pytest.raises(UserError, match=r"tiny_loha.*loha \(206 modules\).*merge --mode svd"):
        resize(KOHYA_LOHA, tmp_path / "x.safetensors", rank=2)
    assert not (tmp_path / "x.safetensors").exists()


# --- merge ---------------------------------------------------------------------------------------------------

from lora_trainer.networks.tools.merge import merge  # noqa: E402

KOHYA_LORA_EPOCH_1 = REFERENCE / "kohya-fixtures" / "lora-baseline" / "tinylora-000001.safetensors"


def test_concat_merge_is_exactly_the_weighted_sum_of_deltas(tmp_path):
    out = tmp_path / "concat.safetensors"
    assert main(["lora", "merge", f"{KOHYA_LORA}:0.7", f"{KOHYA_LORA_EPOCH_1}:-0.3", "--out", str(out), "--precision", "fp32"]) == 0
    first, second, merged = deltas(read_network(KOHYA_LORA)), deltas(read_network(KOHYA_LORA_EPOCH_1)), deltas(read_network(out))
    assert merged.keys() == first.keys()
    for name, delta in merged.items():
        expected = 0.7 * first[name] - 0.3 * second[name]
        assert torch.allclose(delta, expected, atol=1e-6 * float(expected.abs().max())), name
    summary = inspect_network(out)
    assert summary.dim == "8" and summary.hash_matches and summary.metadata["modelspec.merged_from"] == "tinylora, tinylora-000001"


def test_merge_takes_sd_scripts_models_and_ratios_as_merge_lora_py_does(tmp_path, capsys):
    """A Kohya user's ``--models A B --ratios 0.7 -0.3 --save_to OUT`` (sd-scripts' merge_lora.py; its ``--concat``
    too) was refused as unrecognised arguments; it is the same merge as ``A:0.7 B:-0.3`` (r × ΔW: merge_lora.py's own
    arithmetic gives r·|r| × ΔW, said in --help)."""
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    assert main(["lora", "merge", f"{KOHYA_LORA}:0.7", f"{KOHYA_LORA_EPOCH_1}:-0.3", "--out", str(ours)]) == 0
    assert main(["lora", "merge", "--models", str(KOHYA_LORA), str(KOHYA_LORA_EPOCH_1), "--ratios", "0.7", "-0.3",
                 "--save_to", str(theirs)]) == 0
    assert deltas(read_network(ours)).keys() == deltas(read_network(theirs)).keys()
    for name, delta in deltas(read_network(theirs)).items():
        assert torch.equal(delta, deltas(read_network(ours))[name]), name
    capsys.readouterr()
    assert main(["lora", "merge", "--models", str(KOHYA_LORA), str(KOHYA_LORA_EPOCH_1), "--ratios", "0.7",
                 "--save_to", str(tmp_path / "x.safetensors")]) == 2
    assert "--ratios: give one ratio for each of the 2 --models (1 given)" in capsys.readouterr().err
    assert main(["lora", "merge", str(KOHYA_LORA), "--models", str(KOHYA_LORA), "--save_to", str(tmp_path / "y.safetensors")]) == 2
    assert "give the networks once" in capsys.readouterr().err
    # ratios for files given as FILE[:WEIGHT] were ignored (merged at 1.0)
    assert main(["lora", "merge", str(KOHYA_LORA), str(KOHYA_LORA_EPOCH_1), "--ratios", "0.1", "0.1",
                 "--save_to", str(tmp_path / "z.safetensors")]) == 2
    assert "--ratios weighs the --models files" in capsys.readouterr().err and not (tmp_path / "z.safetensors").exists()
    assert main(["lora", "merge", "--models", str(KOHYA_LORA), "--concat", "--save_to", str(tmp_path / "c.safetensors")]) == 0


def test_svd_merge_of_a_lora_and_a_loha_at_full_rank_is_the_weighted_sum(tmp_path):
    out = tmp_path / "svd.safetensors"
    result = merge([(KOHYA_LORA, 0.5), (KOHYA_LOHA, 1.0)], out, mode="svd", rank=10_000, model=TINY_KOHYA_CHECKPOINT,
                   precision="fp32", clamp_quantile=1.0)
    lora, merged = deltas(read_network(KOHYA_LORA)), read_network(out)
    loha = read_network(KOHYA_LOHA).modules
    assert set(merged.modules) == set(lora) | set(loha)
    for name, module in merged.modules.items():
        delta = module_delta(module, torch.empty(lora_layer_shape(module), device="meta")).weight
        expected = module_delta(loha[name], torch.empty(delta.shape, device="meta")).weight if name in loha else torch.zeros_like(delta)
        if name in lora:
            expected = expected + 0.5 * lora[name].reshape(delta.shape)
        assert torch.allclose(delta, expected, atol=1e-5 * float(expected.abs().max())), name
    assert result.metadata["ss_network_module"] == "networks.lora" and result.metadata["ss_base_model_version"] == "sd_v1"


def test_svd_merge_asks_for_the_model_only_when_it_needs_it(tmp_path):
    with pytest.raises(UserError, match=r"tiny_loha.*layer's shape.*--model"):
        merge([(KOHYA_LOHA, 1.0)], tmp_path / "a.safetensors", mode="svd", rank=4)
    with pytest.raises(UserError, match=r"lora_dora.*depends on the base weights.*--model"):
        merge([(REFERENCE / "network-fixtures" / "lora_dora.safetensors", 1.0)], tmp_path / "b.safetensors", mode="svd", rank=4)
    result = merge([(KOHYA_LORA, 1.0)], tmp_path / "c.safetensors", mode="svd", rank=2)  # LoRA: shapes are in the file
    assert {int(t.shape[0]) for k, t in result.tensors.items() if k.endswith("lora_down.weight")} == {2}
    assert list(tmp_path.iterdir()) == [tmp_path / "c.safetensors"]


def test_concat_merge_refuses_other_algorithms_and_other_base_models(tmp_path):
    with pytest.raises(UserError, match=r"tiny_loha.*loha.*--mode svd"):
        merge([(KOHYA_LORA, 1.0), (KOHYA_LOHA, 1.0)], tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="different base models"):
        merge([(KOHYA_LORA, 1.0), (LYCORIS_SDXL_LORA, 1.0)], tmp_path / "b.safetensors")


# --- extract -------------------------------------------------------------------------------------------------

from lora_trainer.networks.tools.extract import extract  # noqa: E402

# checkpoint layer → Kohya module: a text-encoder Linear, a UNet attention Linear, SD1's 1×1 proj_in, a ResBlock 3×3 conv
TUNED_LAYERS = {
    "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight": "lora_te_text_model_encoder_layers_1_mlp_fc2",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "model.diffusion_model.output_blocks.3.1.proj_in.weight": "lora_unet_up_blocks_1_attentions_0_proj_in",
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": "lora_unet_down_blocks_0_resnets_0_conv1",
}


@pytest.fixture(scope="module")
def tuned_checkpoint(tmp_path_factory):
    """The tiny Kohya checkpoint with a known rank-2 change added to four layers, saved in fp32 (no rounding)."""
    generator = torch.Generator().manual_seed(1)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(TINY_KOHYA_CHECKPOINT).items()}
    changes = {}
    for key in TUNED_LAYERS:
        shape = state[key].shape
        change = (torch.randn(shape[0], 2, generator=generator) @ torch.randn(2, shape[1:].numel(), generator=generator)) * 0.05
        changes[key] = change.reshape(shape)
        state[key] = state[key] + changes[key]
    path = tmp_path_factory.mktemp("extract") / "tuned.safetensors"
    save_file(state, str(path))
    return path, changes


def test_extracted_lora_reproduces_the_fine_tune_and_loads_with_every_key_matched(tuned_checkpoint, tmp_path):
    from lora_trainer.models.checkpoint import load_checkpoint
    from lora_trainer.networks.apply import MergedNetworks

    tuned, changes = tuned_checkpoint
    out = tmp_path / "extracted.safetensors"
    reported = []
    result = extract(TINY_KOHYA_CHECKPOINT, tuned, out, dim=4, conv_dim=4, clamp_quantile=1.0, precision="fp32",
                     progress=lambda done, total: reported.append((done, total)))
    network = read_network(out)
    assert reported[-1] == (len(network.modules), len(network.modules))  # a layer at a time, as the CLI's bar shows
    for key, name in TUNED_LAYERS.items():
        module = network.modules[name]
        assert module["lora_down.weight"].shape[0] == 4 and float(module["alpha"]) == 4.0
        delta = module_delta(module, torch.empty(changes[key].shape, device="meta")).weight
        assert torch.allclose(delta, changes[key], atol=1e-5), name
    untouched = network.modules["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert float(module_delta(untouched, torch.empty(lora_layer_shape(untouched), device="meta")).weight.abs().max()) < 1e-6
    assert result.metadata["ss_network_module"] == "networks.lora" and result.metadata["ss_base_model_version"] == "sd_v1"
    assert json.loads(result.metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}

    model = load_checkpoint(TINY_KOHYA_CHECKPOINT)
    merged = MergedNetworks.for_model(model.config, model.unet, model.text_encoders)
    (report,) = merged.set_networks([(network, Strength(1.0))])
    assert report.unmatched == [] and report.problems == [] and len(report.matched) == len(network.modules)
    fc2 = model.text_encoders[0].get_submodule("text_model.encoder.layers.1.mlp.fc2").weight
    tuned_fc2 = load_file(tuned)["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"]
    assert torch.allclose(fc2, tuned_fc2, atol=1e-5)


def test_extract_skips_unchanged_text_encoders_and_convs_without_conv_dim(tuned_checkpoint, tmp_path, capsys):
    tuned, _ = tuned_checkpoint
    out = tmp_path / "unet only.safetensors"
    assert main(["lora", "extract", "--model_org", str(TINY_KOHYA_CHECKPOINT), "--model_tuned", str(tuned),
                 "--out", str(out), "--dim", "2", "--min_diff", "1"]) == 0
    assert "text encoder unchanged" in capsys.readouterr().out
    summary = inspect_network(out)
    assert "TE" not in {b.block for b in summary.blocks} and summary.hash_matches
    names = set(read_network(out).modules)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" not in names  # no --conv_dim: ResBlocks are not extracted
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names


def test_extract_refuses_a_lora_given_as_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="tinylora.*not an SD1/SD2/SDXL checkpoint"):
        extract(TINY_KOHYA_CHECKPOINT, KOHYA_LORA, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_the_long_tools_report_their_progress_module_by_module(tmp_path):
    """An SDXL extract or SVD merge runs minutes on a CPU: the CLI draws these calls as a bar."""
    from lora_trainer.networks.tools.merge import merge
    from lora_trainer.networks.tools.resize import resize

    for tool in (lambda progress: resize(KOHYA_LORA, tmp_path / "r.safetensors", 2, progress=progress),
                 lambda progress: merge([(KOHYA_LOHA, 1.0)], tmp_path / "m.safetensors", "svd", 2,
                                        model=TINY_KOHYA_CHECKPOINT, progress=progress)):
        calls = []
        tool(lambda done, total: calls.append((done, total)))
        total = calls[-1][1]
        assert total > 1 and calls[-1] == (total, total) and [done for done, _ in calls] == sorted(done for done, _ in calls)


# --- what every tool checks before its work --------------------------------------------------------------------

def test_no_tool_overwrites_an_input_even_a_read_only_one_or_writes_a_ckpt_it_cannot(tmp_path):
    """bake --out my_lora.safetensors replaced the LoRA with a checkpoint; merge --out base replaced the checkpoint."""
    import shutil

    lora, base = tmp_path / "my lora.safetensors", tmp_path / "base.safetensors"
    shutil.copy(KOHYA_LORA, lora)
    shutil.copy(TINY_KOHYA_CHECKPOINT, base)
    lora.chmod(0o444)
    before = lora.read_bytes(), base.read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite an input"):
        bake(base, [(lora, Strength(1.0))], lora)
    with pytest.raises(UserError, match="refusing to overwrite an input"):
        merge([(KOHYA_LOHA, 1.0)], base, mode="svd", rank=4, model=base)
    assert (lora.read_bytes(), base.read_bytes()) == before
    for out, problem in ((tmp_path / "x.ckpt", "write safetensors files; name it x.safetensors"),
                         (tmp_path, "is a folder"), (lora / "x.safetensors", "is not writable")):
        for run in (lambda: resize(KOHYA_LORA, out, rank=2), lambda: merge([(KOHYA_LORA, 1.0)], out),
                    lambda: extract(base, base, out), lambda: bake(base, [(KOHYA_LORA, Strength(1.0))], out)):
            with pytest.raises(UserError, match=problem):  # said before any work, not a traceback after it
                run()


def test_a_diverged_lora_is_named_by_resize_and_merge_and_shown_by_inspect(tmp_path):
    tensors = load_file(KOHYA_LORA)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    diverged = tmp_path / "diverged.safetensors"
    save_file(tensors, str(diverged))
    for run in (lambda: resize(diverged, tmp_path / "r.safetensors", rank=2),
                lambda: merge([(diverged, 1.0)], tmp_path / "m.safetensors"),
                lambda: merge([(diverged, 1.0)], tmp_path / "s.safetensors", mode="svd", rank=2)):
        with pytest.raises(UserError, match=f"{key.rsplit('.', 2)[0]}: NaN or Inf in lora_up.weight.*diverged"):
            run()
    assert any("NaN or Inf in lora_up.weight" in p for p in inspect_network(diverged).problems)
    assert not list(tmp_path.glob("[rms].safetensors"))


def test_numbers_the_tools_cannot_use_are_refused_by_option(tmp_path):
    out = tmp_path / "o.safetensors"
    for quantile in (0, -0.5, 2, float("nan")):  # 0 clamped every factor to a negative limit: ΔW off 124×
        with pytest.raises(UserError, match="--clamp_quantile"):
            merge([(KOHYA_LORA, 1.0)], out, mode="svd", rank=2, clamp_quantile=quantile)
    for method, parameter in (("sv_ratio", 0), ("sv_fro", -1), ("sv_cumulative", 1.5)):
        with pytest.raises(UserError, match=f"--dynamic_param {parameter}"):
            resize(KOHYA_LORA, out, rank=4, method=method, parameter=parameter)
    with pytest.raises(UserError, match="are for --mode svd"):
        merge([(KOHYA_LORA, 1.0)], out, rank=2)
    assert main(["lora", "resize", str(KOHYA_LORA), "--out", str(out), "--new_rank", "2", "--save_precision", "float"]) == 0
    assert load_file(out)[next(iter(load_file(out)))].dtype == torch.float32  # sd-scripts' name for fp32


def test_a_baked_checkpoint_does_not_carry_the_source_s_content_hashes(tmp_path):
    source = tmp_path / "hashed base.safetensors"
    save_file(load_file(TINY_KOHYA_CHECKPOINT), str(source), {"modelspec.hash_sha256": "0x" + "ab" * 32,
                                                               "modelspec.title": "base"})
    bake(source, [(KOHYA_LORA, Strength(1.0))], tmp_path / "baked.safetensors")
    with safe_open(str(tmp_path / "baked.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert "modelspec.hash_sha256" not in metadata and metadata["modelspec.title"] == "base"


def test_inspect_says_when_a_file_changes_nothing(tmp_path):
    """A LoRA saved before its first step (or at a learning rate of 0): every lora_up still zero."""
    tensors = {k: (torch.zeros_like(v) if k.endswith("lora_up.weight") else v) for k, v in load_file(KOHYA_LORA).items()}
    save_file(tensors, str(tmp_path / "untrained.safetensors"))
    assert any("every lora_up is zero" in p for p in inspect_network(tmp_path / "untrained.safetensors").problems)
    assert not any("every lora_up is zero" in p for p in inspect_network(KOHYA_LORA).problems)


def test_conv_rank_applies_to_one_by_one_convolutions_as_sd_scripts_resizes_them(tmp_path):
    """sd-scripts' resize_lora.py takes --new_conv_rank for every 4-D module: SD1's 1×1 proj_in/proj_out too."""
    result = resize(KOHYA_LORA, tmp_path / "r.safetensors", rank=2, conv_rank=1)
    ranks = {k.rsplit(".", 2)[0]: (t.dim(), t.shape[0]) for k, t in result.tensors.items() if k.endswith("lora_down.weight")}
    assert {rank for dim, rank in ranks.values() if dim == 4} == {1} and {rank for dim, rank in ranks.values() if dim == 2} == {2}
    assert any(name.endswith("proj_in") for name, (dim, _) in ranks.items() if dim == 4)


def test_a_concat_merge_saved_in_fp16_keeps_the_digits_of_a_small_alpha(tmp_path):
    """α = 1 at rank 64 scales ΔW by 1/64: folded into lora_up alone, fp16 stored its values as subnormals."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name in ("lora_unet_a", "lora_unet_b"):
        tensors |= {f"{name}.lora_down.weight": torch.randn(64, 320, generator=generator) * 0.05,
                    f"{name}.lora_up.weight": torch.randn(320, 64, generator=generator) * 1e-3,
                    f"{name}.alpha": torch.tensor(1.0)}
    save_file(tensors, str(tmp_path / "small alpha.safetensors"))
    merge([(tmp_path / "small alpha.safetensors", 0.5)], tmp_path / "m.safetensors", precision="fp16")
    for name, delta in deltas(read_network(tmp_path / "m.safetensors")).items():
        expected = 0.5 * deltas(read_network(tmp_path / "small alpha.safetensors"))[name]
        assert float((delta - expected).norm() / expected.norm()) < 2e-3, name


def test_a_file_given_with_too_many_numbers_says_so():
    from lora_trainer.networks.tools.commands import network_with_numbers

    assert network_with_numbers(f"{KOHYA_LORA}:0.5:0.8", 2) == (KOHYA_LORA, [0.5, 0.8])
    with pytest.raises(UserError, match="at most 2 numbers after the file"):
        network_with_numbers(f"{KOHYA_LORA}:1:2:3", 2)  # was "no such network file …:1"
    with pytest.raises(UserError, match="at most 1 number after the file"):
        network_with_numbers(f"{KOHYA_LORA}:1:2", 1)


def test_inspect_takes_a_loras_name_as_grid_and_generate_do(tmp_path, capsys, monkeypatch):
    """`lora inspect zkstar` said "no such network file" where `grid zkstar` and `<lora:zkstar>` find it."""
    from lora_trainer.grid.bench import make_epoch_files

    make_epoch_files(tmp_path / "models" / "Lora", "zkstar", epochs=2)
    monkeypatch.chdir(tmp_path)
    assert main(["lora", "inspect", "zkstar", "zkstar@e1"]) == 0
    out = capsys.readouterr().out
    assert "zkstar.safetensors" in out and "zkstar-000001.safetensors" in out
    assert main(["lora", "inspect", "nosuch"]) == 2
    assert "nosuch: no such network file, nor a LoRA of that name in models" in capsys.readouterr().err
