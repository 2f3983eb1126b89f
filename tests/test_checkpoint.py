"""Tests of model checkpoints: round trip, sha256, and every refusal."""

import hashlib
import pickle

import numpy as np
import pytest
import torch

from openmm_tbg import checkpoint
from openmm_tbg.checkpoint import CheckpointError, load_model, save_model
from openmm_tbg.encoding import ENCODING_VERSION
from openmm_tbg.flow import TransferableFlow
from openmm_tbg.nn.egnn import EGNNVectorField


def make_flow(dtype=torch.float32) -> TransferableFlow:
    torch.manual_seed(0)  # parameter init only
    field = EGNNVectorField(n_layers=2, hidden=16, max_residues=2, n_atom_classes=10)
    with torch.no_grad():
        for layer in field.layers:
            layer.coord_mlp[-1].weight.normal_(0.0, 0.1)
    return TransferableFlow(field, length_scale=0.07, prior_std=1.2).to(dtype)


TOKENS = np.array([[0, 1, 2], [0, 1, 3], [0, 1, 3], [1, 4, 5], [1, 4, 6]], dtype=np.int64)


@pytest.fixture
def saved(tmp_path):
    flow = make_flow()
    path = tmp_path / "model.pt"
    digest = save_model(flow, path, metadata={"steps": 10, "losses": [1.0, 0.5], "note": None})
    return flow, path, digest


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_gives_the_same_model(tmp_path, dtype):
    flow = make_flow(dtype)
    path = tmp_path / "sub" / "model.pt"
    digest = save_model(flow, path, metadata={"data": {"peptides": ["AA", "NY"]}})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    # A model file gets the usual permissions (not the 0600 of the temporary file it is written through).
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    loaded = load_model(path)
    assert loaded.checkpoint_sha256 == digest
    assert loaded.checkpoint_path == str(path.resolve())
    assert loaded.checkpoint_metadata == {"data": {"peptides": ["AA", "NY"]}}
    assert loaded.dtype == dtype and not loaded.training
    assert loaded.config == flow.config
    kw = dict(method="rk4", step_size=0.25)
    a = flow.sample(TOKENS, 3, generator=1, **kw)
    b = loaded.sample(TOKENS, 3, generator=1, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not [f for f in path.parent.iterdir() if f.name != "model.pt"]  # no temporary files left


def test_missing_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither a shipped model nor an existing checkpoint file"):
        load_model(tmp_path / "nothing.pt")
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL_PATH", tmp_path / "tbg_dipeptides.pt")
    with pytest.raises(FileNotFoundError, match="No pretrained model ships"):
        load_model()


def test_corrupt_files_are_refused(saved, tmp_path):
    _, path, _ = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    text = tmp_path / "text.pt"
    text.write_text("ATOM      1  N   ALA A   1\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, text, empty):
        with pytest.raises(CheckpointError, match="corrupt"):
            load_model(bad)


class _Foreign:
    """A class that weights_only loading must refuse to unpickle."""


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    with pytest.raises(CheckpointError, match="not an openmm_tbg model checkpoint"):
        load_model(plain)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not an openmm_tbg model checkpoint"):
        load_model(tensor)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "openmm_tbg.checkpoint", "obj": _Foreign()}, unsafe)
    with pytest.raises(CheckpointError, match="corrupt"):  # weights_only refuses arbitrary classes
        load_model(unsafe)
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(pickle.dumps({"format": "openmm_tbg.checkpoint"}))
    with pytest.raises(CheckpointError):
        load_model(pickled)


def _rewrite(path, out, **changes):
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del payload[key]
        else:
            payload[key] = value
    torch.save(payload, out)
    return out


def test_incompatible_files_are_refused(saved, tmp_path):
    _, path, _ = saved
    with pytest.raises(CheckpointError, match="format_version 2"):
        load_model(_rewrite(path, tmp_path / "v2.pt", format_version=2))
    with pytest.raises(CheckpointError, match="atom encoding 'tbg-other'"):
        load_model(_rewrite(path, tmp_path / "enc.pt", encoding_version="tbg-other"))
    with pytest.raises(CheckpointError, match="missing entries"):
        load_model(_rewrite(path, tmp_path / "nostate.pt", state_dict=None))

    payload = torch.load(path, weights_only=True)
    state = dict(payload["state_dict"])
    state.pop(next(iter(state)))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(_rewrite(path, tmp_path / "missing_key.pt", state_dict=state))
    config = dict(payload["flow_config"], vector_field=dict(payload["flow_config"]["vector_field"], hidden=8))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(_rewrite(path, tmp_path / "shape.pt", flow_config=config))
    config = dict(payload["flow_config"], vector_field=dict(payload["flow_config"]["vector_field"], width=3))
    with pytest.raises(CheckpointError, match="invalid flow configuration"):
        load_model(_rewrite(path, tmp_path / "kwarg.pt", flow_config=config))
    state = {k: (v.clone().fill_(float("nan")) if v.is_floating_point() else v) for k, v in payload["state_dict"].items()}
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(_rewrite(path, tmp_path / "nan.pt", state_dict=state))


def test_stored_format_matches_the_contract(saved):
    _, path, _ = saved
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "format_version", "encoding_version", "family", "flow_config", "state_dict",
                            "metadata"}
    assert payload["format"] == "openmm_tbg.checkpoint" and payload["format_version"] == 1
    assert payload["family"] == "egnn-cnf"


def test_checkpoint_without_family_loads_as_a_cnf(saved, tmp_path):
    """Files written before model families existed have no "family" entry; they are EGNN CNFs."""
    flow, path, _ = saved
    payload = torch.load(path, weights_only=True)
    del payload["family"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    loaded = load_model(old)
    assert loaded.family == "egnn-cnf"
    for key, value in flow.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.cpu())
    payload["family"] = "no-such-family"
    torch.save(payload, old)
    with pytest.raises(CheckpointError, match="family 'no-such-family'"):
        load_model(old)
    assert payload["encoding_version"] == ENCODING_VERSION
    assert payload["metadata"] == {"steps": 10, "losses": [1.0, 0.5], "note": None}


def test_save_refuses_what_it_cannot_store(tmp_path):
    flow = make_flow()
    with pytest.raises(TypeError, match=r"metadata\['arr'\] is of type ndarray"):
        save_model(flow, tmp_path / "m.pt", metadata={"arr": np.zeros(3)})

    class NoConfig(torch.nn.Module):
        def forward(self, t, x, tokens, mask=None):
            return x - x.mean(1, keepdim=True)

    with pytest.raises(TypeError, match="no `config`"):
        save_model(TransferableFlow(NoConfig()), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("family", ["egnn-cnf", "internal-coordinate"])
def test_shipped_models_load_offline_by_name_and_match_their_cards(family):
    """Each packaged model loads by its family name, is a transferable dipeptide model of that family, and the
    first sha256 in its card (the .md beside it) is the file's own; load_model() gives the default one."""
    import re

    from openmm_tbg.checkpoint import DEFAULT_FAMILY, SHIPPED_MODELS

    flow = load_model(family)
    assert flow.family == family
    if family == "internal-coordinate":
        max_residues = flow.vocab_sizes[0]
    else:
        max_residues = flow.vector_field.config["max_residues"]
    assert max_residues == 2
    card = SHIPPED_MODELS[family].with_suffix(".md").read_text()
    shas = re.findall(r"\b[0-9a-f]{64}\b", card)
    assert shas and shas[0] == flow.checkpoint_sha256
    assert load_model().family == DEFAULT_FAMILY


def _write_v1_checkpoint(path, n_layers: int, hidden: int):
    """A random model with the v1 class vocabulary saved to ``path`` as openmm_tbg wrote it under encoding
    tbg-full-v1; returns the flow and the written payload."""
    from openmm_tbg import encoding as enc_mod
    from openmm_tbg.nn.egnn import EGNNVectorField

    torch.manual_seed(0)
    flow = TransferableFlow(EGNNVectorField(n_layers=n_layers, hidden=hidden,
                                            n_atom_classes=len(enc_mod.ATOM_NAME_CLASSES_V1)), length_scale=0.2)
    save_model(flow, path)
    payload = torch.load(path, weights_only=True)
    payload["encoding_version"] = "tbg-full-v1"
    torch.save(payload, path)
    return flow, payload


def test_upgrade_from_v1_encoding_keeps_the_model_exact(tmp_path):
    """A tbg-full-v1 model, upgraded to the split hydrogen classes, computes the same field on every atom."""
    from openmm_tbg import encoding as enc_mod
    from openmm_tbg.checkpoint import upgrade_model
    from openmm_tbg.peptides import build_peptide

    v1_path = tmp_path / "v1.pt"
    old, _ = _write_v1_checkpoint(v1_path, n_layers=2, hidden=16)
    with pytest.raises(CheckpointError, match="upgrade_model"):
        load_model(v1_path)
    upgrade_model(v1_path, tmp_path / "v2.pt")
    new = load_model(tmp_path / "v2.pt")
    assert new.checkpoint_metadata["upgraded_from"]["encoding_version"] == "tbg-full-v1"
    for seq in ("TV", "LI", "RN"):  # the residues whose hydrogen classes were split
        top = build_peptide(seq).topology
        enc = enc_mod.encode_topology(top)
        v1_classes = [enc_mod.ATOM_NAME_CLASSES_V1.index(enc_mod.atom_name_class_v1(a.residue.name, a.name))
                      for a in top.atoms()]
        v1_tokens = torch.as_tensor(enc.tokens).clone()
        v1_tokens[:, 2] = torch.as_tensor(v1_classes)
        assert not torch.equal(v1_tokens, torch.as_tensor(enc.tokens))
        x = torch.randn(3, enc.n_atoms, 3)
        t = torch.tensor([0.1, 0.5, 0.9])
        with torch.no_grad():
            torch.testing.assert_close(new.vector_field(t, x, torch.as_tensor(enc.tokens)),
                                       old.vector_field(t, x, v1_tokens), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="nothing to upgrade"):
        upgrade_model(tmp_path / "v2.pt", tmp_path / "v3.pt")


@pytest.mark.parametrize("damage", ["no_state_dict", "no_embedding", "wrong_width"])
def test_upgrade_of_an_incomplete_v1_file_names_the_problem(tmp_path, damage):
    """upgrade_model reports a damaged v1 file as a CheckpointError, not a KeyError from deep inside."""
    from openmm_tbg.checkpoint import upgrade_model

    path = tmp_path / "v1.pt"
    _, payload = _write_v1_checkpoint(path, n_layers=1, hidden=8)
    key = "vector_field.embed_atom_class.weight"
    if damage == "no_state_dict":
        del payload["state_dict"]
        match = "missing entries"
    elif damage == "no_embedding":
        del payload["state_dict"][key]
        match = "cannot be upgraded"
    else:
        payload["state_dict"]["vector_field.embed_time.weight"] = torch.zeros(3, 1)
        match = "do not fit"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=match):
        upgrade_model(path, tmp_path / "v2.pt")
    assert not (tmp_path / "v2.pt").exists()
