"""``text4seg data refcoco``: the refer layout as a manifest."""

import json
import pickle

import pytest

from text4seg_demo.cli import main
from text4seg_demo.datasets.refer import DatasetError, convert, read_refs
from text4seg_demo.evaluation.manifest import read_manifest
from text4seg_demo.masks import load_mask


def test_refcoco_gives_one_query_per_sentence_with_the_rendered_mask(refer, tmp_path):
    done = convert(refer.root, refer.images, "refcoco", "val", tmp_path / "out")
    queries = read_manifest(tmp_path / "out")
    assert [q.expression for q in queries] == ["left cat", "the cat on the left", "big cat", "dog"]
    assert {q.kind for q in queries} == {"refcoco/val"}
    assert queries[0].image == refer.images / refer.files[0] and queries[0].image.is_absolute()  # no copies
    assert queries[0].mask == queries[1].mask  # two sentences, one referent, one mask file
    assert (load_mask(queries[0].mask) == refer.truth[10]).all()  # a polygon's box fills pixels 4..19
    assert (load_mask(queries[2].mask) == refer.truth[11]).all()  # compressed RLE, exactly
    assert (load_mask(queries[3].mask) == refer.truth[12]).all()  # uncompressed RLE, exactly
    # the referent whose annotation has no polygon is skipped and counted, never silently
    assert done.skipped == {"referents with an annotation that cannot be rendered": 1}
    assert done.queries == 4 and done.referents == 3 and "skipped: 1 referents" in done.summary()


def test_grefcoco_unites_several_targets_and_writes_empty_masks_for_none(refer, tmp_path):
    done = convert(refer.root, refer.images, "grefcoco", "val", tmp_path / "g")
    queries = {q.expression: q for q in read_manifest(tmp_path / "g")}
    assert (load_mask(queries["both cats"].mask) == (refer.truth[10] | refer.truth[11])).all()
    assert not load_mask(queries["the zebra"].mask).any() and not load_mask(queries["a horse"].mask).any()
    assert (load_mask(queries["top left dog"].mask) == refer.truth[12]).all()
    assert done.empty_targets == 1 and done.queries == 4 and not done.skipped


def test_missing_and_mismatched_files_are_named(refer, tmp_path):
    with pytest.raises(DatasetError, match="refcocog has the splits train, val, test; it has no 'testA'"):
        convert(refer.root, refer.images, "refcocog", "testA", tmp_path / "x")
    with pytest.raises(DatasetError, match=r"no .*refcoco\+: --refer must be the folder"):
        convert(refer.root, refer.images, "refcoco+", "val", tmp_path / "x")
    (refer.root / "refcoco" / "instances.json").unlink()
    with pytest.raises(DatasetError, match="missing .*instances.json"):
        convert(refer.root, refer.images, "refcoco", "val", tmp_path / "x")
    with pytest.raises(DatasetError, match="no referents in split 'train'"):
        convert(refer.root, refer.images, "grefcoco", "train", tmp_path / "x")
    # COCO images of another folder: every referent's image is missing, which is an error, not an empty manifest
    with pytest.raises(DatasetError, match="nothing of grefcoco/val could be converted .*image file is missing"):
        convert(refer.root, tmp_path, "grefcoco", "val", tmp_path / "x")


def test_a_refs_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"sentences": [], "x": Payload()}], protocol=2))
    with pytest.raises(DatasetError, match="asks for .*print; a refs file holds only plain"):
        read_refs(path)


def test_the_command_prints_what_it_wrote_and_fails_clearly(refer, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "refcoco", "--refer", str(refer.root), "--images", str(refer.images),
                 "--dataset", "refcoco", "--split", "testA", "--out", str(out)]) == 0
    assert "1 queries from 1 referents" in capsys.readouterr().err
    assert json.loads((out / "manifest.jsonl").read_text())["expression"] == "small dog"
    assert main(["data", "refcoco", "--refer", str(tmp_path / "nowhere"), "--images", str(refer.images),
                 "--dataset", "refcoco", "--split", "val", "--out", str(out)]) == 2
    assert "error: no " in capsys.readouterr().err


@pytest.mark.slow
def test_eval_on_a_converted_split_reports_the_papers_metrics_alike_in_worker_processes(refer, tmp_path, capsys):
    convert(refer.root, refer.images, "grefcoco", "val", tmp_path / "g")
    reports = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["eval", "--data", str(tmp_path / "g"), "--model", "tiny-rrle", "--workers", str(workers),
                     "--rows", str(out.with_suffix(".jsonl")), "--json", str(out.with_suffix(".json"))]) == 0
        reports[workers] = json.loads(out.with_suffix(".json").read_text())
    capsys.readouterr()
    one, two = reports[1], reports[2]
    assert one["n"] == 4 and one["grid"] == 16 and set(one["by_kind"]) == {"grefcoco/val"}
    assert set(one["no_target"]) == {"n", "n_acc", "t_acc"} and one["no_target"]["n"] == 2
    # two replicas in two processes answer every query as the one in this process does (greedy)
    for key in ("ciou", "giou", "grid_ciou", "no_target", "by_kind", "mean_generated_tokens"):
        assert two[key] == one[key]
    assert sorted(r["index"] for r in two["queries"]) == [0, 1, 2, 3]
