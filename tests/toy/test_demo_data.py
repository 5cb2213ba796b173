
from das_sd.data.datasets import open_dataset
from das_sd.toy.demo_data import STYLES, TRIGGERS, make_demo_data
from das_sd.data.ground_truth import load_ground_truth


def test_demo_data_is_deterministic_and_ground_truth_is_consistent(tmp_path, demo_data):
    again = make_demo_data(tmp_path / "again")
    files = sorted(p.relative_to(demo_data) for p in demo_data.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (demo_data / rel).read_bytes() == (again / rel).read_bytes(), rel

    ds = open_dataset(demo_data)
    assert 200 <= len(ds) <= 500
    captions = {s.relpath: s.caption for s in ds}
    truth = load_ground_truth(demo_data)
    assert [g["trigger"] for g in truth["groups"]] == list(TRIGGERS)
    planted = set()
    for group in truth["groups"]:
        assert 3 <= len(group["files"]) <= 12
        for f in group["files"]:
            assert group["trigger"] in captions[f]
            planted.add(f)
    # a trigger word appears in no caption outside its group
    for rel, caption in captions.items():
        if rel not in planted:
            assert not any(t in caption for t in TRIGGERS)
    assert {s["style"] for s in truth["styles"]} == {s.name for s in STYLES}


def test_make_demo_data_refuses_to_overwrite(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    try:
        make_demo_data(out)
    except FileExistsError as exc:
        assert "overwrite" in str(exc)
    else:
        raise AssertionError("expected FileExistsError")
    assert (out / "keep.txt").read_text() == "mine"
