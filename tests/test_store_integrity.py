"""Store integrity: checksums refuse damaged shards and index files, `das-sd verify`, the manifest's
schema, one index generation for all feature sets (a killed index run changes nothing, its files are
removed next time), and no new store beside the files of one whose manifest is gone."""

from __future__ import annotations

import json
import os

import pytest
import torch

from das_sd.cli import main
from das_sd.score import LambdaRule, build_index, train_vectors
from das_sd.store import FeatureStore, Row, StoreError
from das_sd.topk import stream_topk

SETS = ("das", "dtrak")
# every field `das-sd attribute` reads (das_sd.store_integrity.ATTRIBUTE_FIELDS), settings left default
IDENTITY = {"base_fingerprint": "sha256:b", "lora_fingerprint": "sha256:l", "resolution": 64,
            "compute_dtype": "float32", "feature_sets": {name: {} for name in SETS}}


def flip_byte(path, offset_from_end: int = 5) -> None:
    """One bit of one data byte changed in place, with the later mtime another process would see."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(st.st_size - offset_from_end)
        byte = fh.read(1)
        fh.seek(st.st_size - offset_from_end)
        fh.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture()
def store(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, k = 40, 8
    s = FeatureStore.create(tmp_path / "store", IDENTITY, shard_size=16)
    for start in range(0, n, 16):
        m = min(16, n - start)
        rows = [Row(f"k{i}", f"img{i}.png", f"c{i}") for i in range(start, start + m)]
        arrays = {}
        for name in SETS:
            arrays[f"features.{name}"] = torch.randn(m, k, generator=g)
            arrays[f"residuals.{name}"] = torch.rand(m, generator=g) + 0.5
        s.append_shard(rows, arrays)
    for name in SETS:
        build_index(s, name, LambdaRule(rho=100.0))
    return s


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- checksums ------------------------------------------------------------------------------------

def test_damaged_feature_shard_is_refused_naming_it_and_verify(store):
    shard = store.root / "features-00001.safetensors"
    flip_byte(shard)
    for action in (lambda s: build_index(s, "das", LambdaRule()), lambda s: s.load("features.das"),
                   lambda s: stream_topk(s, "tracin", torch.randn(1, 8))):
        with pytest.raises(StoreError) as err:
            action(FeatureStore.open(store.root))
        assert f"{shard}: damaged shard" in str(err.value)
        assert f"das-sd verify --store {store.root}" in str(err.value)


def test_index_command_refuses_a_damaged_shard(store, capsys):
    before = (store.root / "manifest.json").read_bytes()
    flip_byte(store.root / "features-00000.safetensors")
    code, out, err = run(capsys, "index", "--store", str(store.root))
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"{store.root / 'features-00000.safetensors'}: damaged shard" in err and "das-sd verify" in err
    assert (store.root / "manifest.json").read_bytes() == before  # the index in use is untouched


def test_damaged_index_file_is_refused_by_every_reader(store):
    index = store.root / store.index_files("das")[2]
    flip_byte(index)
    q = torch.randn(2, 8)
    for action in (lambda s: train_vectors(s, "das"), lambda s: stream_topk(s, "das", q),
                   lambda s: s.load_index("das")):
        with pytest.raises(StoreError) as err:
            action(FeatureStore.open(store.root))
        assert f"{index}: damaged index file" in str(err.value) and "das-sd verify" in str(err.value)
        assert f"das-sd index --store {store.root}" in str(err.value)  # the way out
    assert train_vectors(store, "dtrak").shape == (40, 8)  # the other set's files are fine
    build_index(store, "das", LambdaRule())  # and a rebuild replaces the damaged file
    assert train_vectors(store, "das").shape == (40, 8)


def test_a_file_changed_after_it_was_checked_is_checked_again(store):
    assert train_vectors(store, "das").shape == (40, 8)  # checked and remembered
    flip_byte(store.root / store.index_files("das")[0])
    with pytest.raises(StoreError, match="damaged index file"):
        train_vectors(store, "das")


def test_verify_passes_a_good_store_and_names_each_damaged_file(store, capsys):
    code, out, _ = run(capsys, "verify", "--store", str(store.root))
    assert code == 0, out
    assert out.strip().splitlines()[-1] == f"{store.root}: 9 of 9 file(s) match their checksums; no problems"
    shard, index = store.root / "features-00002.safetensors", store.root / store.index_files("dtrak")[1]
    flip_byte(shard)
    flip_byte(index, 100)
    (store.root / store.index_files("das")[0]).unlink()
    code, out, err = run(capsys, "verify", "--store", str(store.root))
    lines = out.splitlines()
    assert code == 2 and "3 problem(s)" in err
    assert sum(line.startswith(f"{shard}: damaged shard") for line in lines) == 1
    assert sum(line.startswith(f"{index}: damaged index file") for line in lines) == 1
    assert sum(line.startswith(str(store.root / store.index_files("das")[0])) and "missing" in line
               for line in lines) == 1
    assert lines[-1].endswith("6 of 9 file(s) match their checksums; 3 problem(s)")


def test_stores_without_checksums_still_open_and_verify_calls_them_unverified(store, capsys):
    manifest = json.loads((store.root / "manifest.json").read_text())
    del manifest["checksums"]  # as an older das-sd wrote it
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    old = FeatureStore.open(store.root)
    assert old.load("features.das").shape == (40, 8) and train_vectors(old, "das").shape == (40, 8)
    code, out, _ = run(capsys, "verify", "--store", str(store.root))
    assert code == 0 and "9 unverified (no checksum recorded" in out
    build_index(old, "das", LambdaRule())  # a new index is written with checksums
    assert all(FeatureStore.open(store.root).checksum(f) for f in old.index_files("das"))


def test_verify_reports_a_damaged_manifest_naming_it(tmp_path, capsys):
    (tmp_path / "manifest.json").write_bytes(os.urandom(64) + b"\xf8")
    code, out, err = run(capsys, "verify", "--store", str(tmp_path))
    assert code == 2 and f"{tmp_path / 'manifest.json'}: damaged manifest" in out and "Traceback" not in err


# ---- the manifest's schema ------------------------------------------------------------------------

def test_random_bytes_manifest_is_refused_naming_the_file(tmp_path):
    (tmp_path / "manifest.json").write_bytes(bytes([0xf8, 0x00, 0x9c, 0xff]) + os.urandom(200))
    with pytest.raises(StoreError) as err:
        FeatureStore.open(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'manifest.json'}: damaged manifest (not UTF-8 text")


def test_truncated_manifest_says_where_without_doubled_words(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "identity": {"base": "unterminated')
    with pytest.raises(StoreError) as err:
        FeatureStore.open(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'manifest.json'}: damaged manifest "
                              "(Unterminated string starting at column 44)")


@pytest.mark.parametrize("edit,field", [
    (lambda m: m["shards"][1].update(rows="16"), "shards[1].rows"),
    (lambda m: m["shards"][0].update(keys="k0"), "shards[0].keys"),
    (lambda m: m["shards"][2].update(captions=m["shards"][2]["captions"][:-1]), "shards[2].captions"),
    (lambda m: m["shards"][0].update(file="../../elsewhere.safetensors"), "shards[0].file"),
    (lambda m: m["shards"][1].pop("arrays"), "shards[1].arrays"),
    (lambda m: m["shards"][1].update(keys=m["shards"][0]["keys"]), "shards[1].keys"),
    (lambda m: m.update(shards={"0": {}}), "shards"),
    (lambda m: m.update(identity=[1, 2]), "identity"),
    (lambda m: m.update(shard_size=True), "shard_size"),
    (lambda m: m.update(complete="yes"), "complete"),
    (lambda m: m["indexes"]["das"].update(files="index-das.safetensors"), "indexes.das.files"),
    (lambda m: m["indexes"]["dtrak"].update(rows=None), "indexes.dtrak.rows"),
    (lambda m: m["checksums"]["features-00000.safetensors"].update(sha256="abc"),
     "checksums.features-00000.safetensors.sha256"),
])
def test_manifest_with_a_bad_field_is_refused_naming_file_and_field(store, edit, field):
    path = store.root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as err:
        FeatureStore.open(store.root)
    assert str(err.value).startswith(f"{path}: damaged manifest: field {field!r} must be ")


@pytest.mark.parametrize("edit,field,must", [
    (lambda i: i.update(feature_sets="das"), "identity.feature_sets", "an object"),
    (lambda i: i.update(feature_sets={}), "identity.feature_sets", "a non-empty object"),
    (lambda i: i["feature_sets"].update(das=None), "identity.feature_sets.das", "an object"),
    (lambda i: i["feature_sets"]["das"].update(projection_dim="2048"), "identity.feature_sets.das.projection_dim",
     "an integer >= 1 (found str \"2048\")"),
    (lambda i: i["feature_sets"]["das"].update(timesteps=["x", -1]), "identity.feature_sets.das.timesteps[0]",
     "an integer >= 0"),
    (lambda i: i["feature_sets"]["das"].update(timesteps=[3, -1]), "identity.feature_sets.das.timesteps[1]",
     "an integer >= 0"),
    (lambda i: i["feature_sets"]["das"].update(timesteps="0,10"), "identity.feature_sets.das.timesteps",
     "null or a non-empty list"),
    (lambda i: i["feature_sets"]["dtrak"].update(output="max"), "identity.feature_sets.dtrak.output", "one of "),
    (lambda i: i["feature_sets"]["das"].update(projector=1), "identity.feature_sets.das.projector", "one of "),
    (lambda i: i["feature_sets"]["das"].update(residual="both"), "identity.feature_sets.das.residual", "one of "),
    (lambda i: i["feature_sets"]["das"].update(normalize="yes"), "identity.feature_sets.das.normalize",
     "true or false"),
    (lambda i: i["feature_sets"]["das"].update(noise_seed=1.5), "identity.feature_sets.das.noise_seed",
     "an integer"),
    (lambda i: i["feature_sets"]["das"].update(num_timesteps=0), "identity.feature_sets.das.num_timesteps",
     "an integer >= 1"),
    (lambda i: i["feature_sets"]["das"].update(projection_nonzeros=-2),
     "identity.feature_sets.das.projection_nonzeros", "an integer >= 1"),
    (lambda i: i["feature_sets"]["das"].update(residual_timesteps=None),
     "identity.feature_sets.das.residual_timesteps", "an integer >= 0"),
    (lambda i: i["feature_sets"]["das"].update(projection_dim=2047), "identity.feature_sets.das.projection_dim",
     "a multiple of projection_nonzeros (4)"),
    (lambda i: i.update(resolution="64"), "identity.resolution", "an integer >= 1"),
    (lambda i: i.update(lora_fingerprint=7), "identity.lora_fingerprint", "a string"),
    (lambda i: i.update(compute_dtype="float8"), "identity.compute_dtype", "one of "),
])
def test_bad_identity_field_is_named_by_verify_index_and_attribute(store, capsys, edit, field, must):
    path = store.root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["identity"])
    path.write_text(json.dumps(manifest))
    expected = f"{path}: damaged manifest: field {field!r} must be {must}"
    with pytest.raises(StoreError) as err:
        FeatureStore.open(store.root)
    assert str(err.value).startswith(expected)
    code, out, err = run(capsys, "verify", "--store", str(store.root), "--quiet")
    assert code == 2 and expected in out and "no problems" not in out and "Traceback" not in err
    for argv in (["index"], ["attribute", "--image", "x.png", "--prompt", "x"]):
        code, out, err = run(capsys, *argv, "--store", str(store.root))
        assert code == 2 and out == "" and expected in err and "Traceback" not in err


def test_identity_fields_a_command_needs_are_required_by_it_and_verify(store, capsys):
    path = store.root / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["identity"]["feature_sets"], manifest["identity"]["resolution"]
    path.write_text(json.dumps(manifest))
    FeatureStore.open(store.root)  # a store made by hand (tests, benchmarks) opens with any identity
    code, out, _ = run(capsys, "verify", "--store", str(store.root), "--quiet")
    assert code == 2 and f"{path}: damaged manifest: no identity.feature_sets, identity.resolution" in out
    code, out, err = run(capsys, "index", "--store", str(store.root))
    assert code == 2 and f"{path}: damaged manifest: no identity.feature_sets (das-sd index needs it" in err
    code, out, err = run(capsys, "attribute", "--store", str(store.root), "--image", "x.png")
    assert code == 2 and "no identity.feature_sets, identity.resolution (das-sd attribute needs them" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("version", ["1", 1.0, True])
def test_a_format_version_of_another_type_must_be_the_integer(store, version):
    path = store.root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = version
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as err:
        FeatureStore.open(store.root)
    assert str(err.value).startswith(f"{path}: damaged manifest: field 'format_version' must be the integer 1 "
                                     f"(found {type(version).__name__} ")


# ---- index generations ----------------------------------------------------------------------------

class Killed(BaseException):
    """A SIGKILL stand-in: nothing below the test catches it."""


def test_a_killed_index_run_leaves_every_set_on_the_old_generation_and_the_rerun_removes_its_files(
        store, capsys, monkeypatch):
    before = json.loads((store.root / "manifest.json").read_text())["indexes"]
    save = FeatureStore._save_manifest

    def killed_once_all_files_are_written(self):
        # the index run's files for the last set are on disk: kill before they go into the manifest
        if any(f.name not in before["dtrak"]["files"] for f in self.root.glob("index-dtrak-*.safetensors")):
            raise Killed
        save(self)
    monkeypatch.setattr(FeatureStore, "_save_manifest", killed_once_all_files_are_written)
    with pytest.raises(Killed):
        main(["index", "--store", str(store.root), "--rho", "10"])
    monkeypatch.undo()
    after = FeatureStore.open(store.root)
    assert after.manifest["indexes"] == before  # every set on the old generation, rho 100
    listed = {f for name in SETS for f in after.index_files(name)}
    orphans = {p.name for p in store.root.glob("index-*.safetensors")} - listed
    assert len(orphans) == 2 * 3  # both sets' new files, 3 shards each
    for name in SETS:
        assert train_vectors(after, name).shape == (40, 8)

    code, out, err = run(capsys, "index", "--store", str(store.root), "--rho", "10")
    assert code == 0 and "removed 6 index file(s) an interrupted `das-sd index` left" in err
    infos = json.loads(out)
    assert {infos[name]["lambda_rule"]["rho"] for name in SETS} == {10.0}
    assert len({infos[name]["generation"] for name in SETS}) == 1  # one generation for all sets
    manifest = FeatureStore.open(store.root).manifest
    listed = {f for name in SETS for f in manifest["indexes"][name]["files"]}
    assert {p.name for p in store.root.glob("index-*.safetensors")} == listed
    assert set(manifest["checksums"]) == listed | {s["file"] for s in manifest["shards"]}


def test_build_index_of_one_set_keeps_the_others(store):
    others = store.manifest["indexes"]["dtrak"]
    build_index(store, "das", LambdaRule(rho=3.0))
    reopened = FeatureStore.open(store.root)
    assert reopened.manifest["indexes"]["dtrak"] == others
    assert reopened.manifest["indexes"]["das"]["lambda_rule"]["rho"] == 3.0
    assert {p.name for p in store.root.glob("index-*.safetensors")} == \
        set(reopened.index_files("das")) | set(reopened.index_files("dtrak"))


# ---- a store whose manifest is gone --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["features", "index"])
def test_no_new_store_beside_the_files_of_one_without_manifest(store, kind):
    leftover = "features-00000.safetensors" if kind == "features" else store.index_files("das")[0]
    (store.root / "manifest.json").unlink()
    for p in store.root.glob("*.safetensors"):
        if p.name != leftover:
            p.unlink()
    with pytest.raises(StoreError) as err:
        FeatureStore.open_or_create(store.root, store.identity)
    message = str(err.value)
    assert message.startswith(f"{store.root}: holds feature store files ({leftover}")
    assert "no manifest.json" in message and "another --store folder" in message and "delete" in message
    assert not (store.root / "manifest.json").exists()


def test_featurize_refuses_a_folder_with_shards_but_no_manifest(tmp_path, demo_data, capsys):
    from helpers import TINY_FEATURIZE, subset_dataset

    from das_sd.models.loading import embedded_demo_lora_path

    folder = tmp_path / "store"
    folder.mkdir()
    (folder / "features-00000.safetensors").write_bytes(b"rows of a store whose manifest was deleted")
    data = subset_dataset(demo_data, tmp_path / "data", 2)
    code, out, err = run(capsys, "featurize", "--data", str(data), "--store", str(folder), "--device", "cpu",
                         "--lora", str(embedded_demo_lora_path() / "pytorch_lora_weights.safetensors"),
                         *TINY_FEATURIZE)
    assert code == 2 and "Traceback" not in err
    assert f"{folder}: holds feature store files (features-00000.safetensors" in err
    assert "another --store folder" in err
    assert sorted(p.name for p in folder.iterdir()) == ["features-00000.safetensors"]


def test_merged_shards_keep_their_checksums_and_a_damaged_part_shard_is_refused(store, tmp_path):
    merged = FeatureStore.create(tmp_path / "merged", store.identity, shard_size=16)
    first, second = store.manifest["shards"][:2]
    merged.adopt_shard(store.root / first["file"], first, store.checksum(first["file"]))
    assert merged.checksum("features-00000.safetensors") == store.checksum(first["file"])
    flip_byte(store.root / second["file"])
    with pytest.raises(StoreError, match=f"{store.root / second['file']}: damaged shard"):
        merged.adopt_shard(store.root / second["file"], second, store.checksum(second["file"]))
    assert len(FeatureStore.open(merged.root)) == 16


def test_checking_on_read_can_be_turned_off_to_time_cold_reads(store, monkeypatch):
    from das_sd import store_integrity

    flip_byte(store.root / store.index_files("das")[0])
    monkeypatch.setattr(store_integrity, "VERIFY_ON_READ", False)
    assert train_vectors(store, "das").shape == (40, 8)


def test_refresh_indexes_builds_the_stale_sets_as_one_generation(store):
    from das_sd.score import refresh_indexes

    assert refresh_indexes(store) == {}  # every set current: nothing rebuilt
    store.append_shard([Row("new", "new.png", "new")], {
        **{f"features.{name}": torch.ones(1, 8) for name in SETS},
        **{f"residuals.{name}": torch.ones(1) for name in SETS}})
    assert not any(store.index_is_current(name) for name in SETS)
    built = refresh_indexes(store)
    assert set(built) == set(SETS) and len({info["generation"] for info in built.values()}) == 1
    assert all(FeatureStore.open(store.root).index_is_current(name) for name in SETS)
