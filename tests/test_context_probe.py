"""The context probe's data (nonlocal_demo.relational) and ``projects/demo/context_probe.py``."""

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from itertools import combinations

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from nonlocal_det.data.coco_check import check_coco_json
from nonlocal_demo.relational import (
    HELD_OUT_RULES,
    RELATION_TASKS,
    RelationSpec,
    generate_relation_coco,
    make_relation_image,
    register_relation_coco,
    relation_categories,
)
from nonlocal_demo.generate_data import main as generate_data_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(REPO, "projects", "demo", "context_probe.py")
SMALL = dict(num_train=16, num_val=4)
SPEC = RelationSpec()


def _probe_module():
    spec = importlib.util.spec_from_file_location("context_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=list(RELATION_TASKS))
def generated(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(request.param) / "data")
    assert generate_relation_coco(root, request.param, **SMALL)
    return request.param, root


def _files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _coco(root, split):
    with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
        return json.load(f)


def test_same_seed_same_bytes_other_seed_other_bytes(generated, tmp_path):
    task, root = generated
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    generate_relation_coco(again, task, **SMALL)
    generate_relation_coco(other, task, seed=1, **SMALL)
    files = _files(root)
    assert len(files) == 2 + sum(SMALL.values())
    assert _files(again) == files
    assert _files(other).keys() == files.keys() and _files(other) != files
    assert not generate_relation_coco(root, task, **SMALL)  # there: left as it is


def test_the_command_writes_each_task_and_the_demo_by_default(tmp_path, capsys):
    args = ["--num-train", "3", "--num-val", "2"]
    assert generate_data_main(["--root", str(tmp_path / "demo"), *args]) == 0
    assert generate_data_main(["--root", str(tmp_path / "twin"), "--task", "twin", *args]) == 0
    out = capsys.readouterr().out
    assert "circle_paired=" in out and "square_single=" in out
    demo = _coco(str(tmp_path / "demo"), "train")
    assert [c["name"] for c in demo["categories"]][-1] == "star_person"
    twin = _coco(str(tmp_path / "twin"), "train")
    assert twin["info"]["task"] == "twin" and len(twin["images"]) == 3
    direct = str(tmp_path / "direct")
    generate_relation_coco(direct, "twin", num_train=3, num_val=2)
    assert _files(direct) == _files(str(tmp_path / "twin"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_categories_and_masks(generated, split):
    task, root = generated
    coco = _coco(root, split)
    summary = check_coco_json(os.path.join(root, "annotations", f"instances_{split}.json"))
    words = RELATION_TASKS[task]
    shapes = HELD_OUT_RULES[task]["shapes"] if task in HELD_OUT_RULES else ("circle", "square")
    assert summary.thing_classes == [f"{s}_{w}" for s in shapes for w in words]
    assert coco["categories"] == list(relation_categories(task))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    counts = Counter(names[a["category_id"]] for a in coco["annotations"])
    if split == "train":
        assert set(counts) == set(summary.thing_classes)  # every class occurs
    low, high = SPEC.objects(task)
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    assert set(per_image) == {im["id"] for im in coco["images"]}
    assert all(low <= n <= high for n in per_image.values())
    images = {im["id"]: im for im in coco["images"]}
    for a in coco["annotations"]:
        assert names[a["category_id"]].startswith(a["shape"] + "_")
        im = images[a["image_id"]]
        rle = mask_util.frPyObjects(a["segmentation"], im["height"], im["width"])
        mask = mask_util.decode(mask_util.merge(rle))
        assert int(mask.sum()) == a["area"]
        ys, xs = np.nonzero(mask)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        # the pixels are the recorded colour (plus the noise)
        pixels = cv2.imread(os.path.join(root, split, im["file_name"]))[:, :, ::-1][mask > 0]
        assert np.abs(pixels.mean(axis=0) - a["colour"]).max() < 3.0
        if task in HELD_OUT_RULES:
            assert list(HELD_OUT_RULES[task]["palette"][a["colour_index"]]) == a["colour"]
        elif task != "cue":
            assert list(SPEC.palette[a["colour_index"]]) == a["colour"]


def _centre(box):
    return np.array([box[0] + box[2] / 2, box[1] + box[3] / 2])


def _far_from_cue(task, box, cue_box):
    """The distance the task's rule bounds: an object's centre to the cue's centre (cue, plus) or
    to the nearest point of the bar's box (bar); and that bound, in pixels at 192 px."""
    c = _centre(box)
    if task == "bar":
        lo = np.array(cue_box[:2], dtype=float)
        nearest = np.clip(c, lo, lo + np.array(cue_box[2:]))
        return np.hypot(*(c - nearest)), HELD_OUT_RULES[task]["cue_distance"] * 192
    far = HELD_OUT_RULES[task]["cue_distance"] if task in HELD_OUT_RULES else SPEC.cue_distance
    return np.hypot(*(c - _centre(cue_box))), far * 192


def test_the_relation_decides_the_category(generated):
    """From the generator's own record of colours: twin task, paired iff another object of the
    image has exactly its colour (never three); match task, match iff the cue's colour; cue tasks,
    the cue's colour (objects of one colour: grey in the cue task, from their own palette in the
    held-out ones). Every two objects (the cue included in the match task) are at least
    min_distance x the image size apart; the cue tasks' objects at least their cue_distance from
    the cue."""
    task, root = generated
    rule = HELD_OUT_RULES.get(task)
    min_distance = rule["min_distance"] if rule else SPEC.min_distance
    holds_count = total = 0
    for split in ("train", "val"):
        coco = _coco(root, split)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        by_image = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for im in coco["images"]:
            anns = by_image[im["id"]]
            colours = Counter(tuple(a["colour"]) for a in anns)
            if task == "twin":
                assert max(colours.values()) <= 2
            for a in anns:
                if task == "twin":
                    holds = colours[tuple(a["colour"])] == 2
                elif task == "match":
                    holds = a["colour"] == im["cue"]["colour"]
                elif rule:
                    first, second = (list(c) for c in rule["cue_colours"])
                    assert im["cue"]["colour"] in (first, second)
                    assert im["cue"]["colour_index"] == (im["cue"]["colour"] == second)
                    holds = im["cue"]["colour"] == first
                    assert a["colour"] not in (first, second)
                else:
                    holds = im["cue"]["colour"] == [220, 40, 40]  # red
                    assert im["cue"]["colour"] in ([220, 40, 40], [50, 90, 230])
                    assert len(set(a["colour"])) == 1  # grey
                assert names[a["category_id"]].endswith("_" + RELATION_TASKS[task][not holds])
                holds_count += holds
                total += 1
            boxes = [a["bbox"] for a in anns] + ([im["cue"]["bbox"]] if task == "match" else [])
            # a drawn shape's box centre is within 2 px of the centre it was placed at
            for b, c in combinations(boxes, 2):
                assert np.hypot(*(_centre(b) - _centre(c))) >= min_distance * 192 - 4
            if task not in ("twin", "match"):
                for b in boxes:
                    d, far = _far_from_cue(task, b, im["cue"]["bbox"])
                    assert d >= far - 4, (im["id"], d, far)
    assert 0.25 < holds_count / total < 0.75, (holds_count, total)


@pytest.mark.parametrize("task", list(RELATION_TASKS))
def test_own_colour_and_place_do_not_tell_the_category(task):
    """Over many images every palette colour is as often of either kind (twin, match, the
    held-out tasks' object palettes), and the kinds are placed alike (mean distance from the
    image centre), as are the cue's two colours (the held-out tasks)."""
    palette = HELD_OUT_RULES[task]["palette"] if task in HELD_OUT_RULES else SPEC.palette
    by_colour, dist, cue_dist = Counter(), {True: [], False: []}, {True: [], False: []}
    for i in range(600 if task in ("twin", "match", "cue") else 200):
        _, anns, extra = make_relation_image(np.random.default_rng([7, 0, i]), 192, task)
        for a in anns:
            holds = a["category_id"] in (1, 3)
            by_colour[(a["colour_index"], holds)] += task != "cue"
            dist[holds].append(np.hypot(*(_centre(a["bbox"]) - 96)))
        if task in HELD_OUT_RULES:
            cue_dist[extra["cue"]["colour_index"] == 0].append(
                np.hypot(*(_centre(extra["cue"]["bbox"]) - 96))
            )
    for c in range(len(palette)) if task != "cue" else ():
        share = by_colour[(c, True)] / (by_colour[(c, True)] + by_colour[(c, False)])
        assert 0.3 < share < 0.7, (task, c, share)
    assert abs(np.mean(dist[True]) - np.mean(dist[False])) < 4.0, task
    if task in HELD_OUT_RULES:
        assert abs(np.mean(cue_dist[True]) - np.mean(cue_dist[False])) < 4.0, task


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="task='pairs' is not supported; allowed"):
        generate_relation_coco(str(tmp_path / "a"), "pairs")
    with pytest.raises(ValueError, match="min_distance=0.1"):
        generate_relation_coco(str(tmp_path / "b"), "twin", spec=RelationSpec(min_distance=0.1))
    with pytest.raises(ValueError, match="num_train=0 is not supported"):
        generate_relation_coco(str(tmp_path / "c"), "twin", num_train=0)


def test_registered_through_register_coco_dataset(generated):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    task, root = generated
    train, val = register_relation_coco(root, name_prefix=f"test_probe_{task}")
    assert MetadataCatalog.get(val).thing_classes == [c["name"] for c in relation_categories(task)]
    assert len(DatasetCatalog.get(train)) == SMALL["num_train"]


def test_confusion_and_partners():
    probe = _probe_module()
    _, anns, _ = make_relation_image(np.random.default_rng([3, 0, 5]), 192, "twin")
    gt = {
        "images": [{"id": 1, "file_name": "x.png", "height": 192, "width": 192}],
        "annotations": [{"id": i + 1, "image_id": 1, **a} for i, a in enumerate(anns)],
        "categories": list(relation_categories("twin")),
    }
    flip = {1: 2, 2: 1, 3: 4, 4: 3}  # the other relation word, same shape
    dets = [
        {"image_id": 1, "bbox": a["bbox"], "score": 0.9, "category_id": a["category_id"]}
        for a in anns
    ] + [
        {"image_id": 1, "bbox": a["bbox"], "score": 0.5, "category_id": flip[a["category_id"]]}
        for a in anns
    ]
    right = probe.relation_confusion(gt, dets)
    assert right["relation_accuracy"] == 1.0 and right["shape_accuracy"] == 1.0
    for d in dets:
        d["score"] = 1.4 - d["score"]  # now the wrong relation scores higher
    wrong = probe.relation_confusion(gt, dets)
    assert wrong["relation_accuracy"] == 0.0 and wrong["matched"] == len(anns)
    missed = probe.relation_confusion(gt, [])
    assert sum(missed["counts"][w]["missed"] for w in missed["words"]) == len(anns)
    pairs = probe.partner_pairs(gt, "twin").get(1, [])
    paired = [a for a in anns if a["category_id"] in (1, 3)]
    assert len(pairs) == len(paired)
    for q, p in pairs:
        (a,) = [x for x in anns if x["bbox"] == q]
        (b,) = [x for x in anns if x["bbox"] == p]
        assert a is not b and a["colour"] == b["colour"]
    on = probe._cells_on([20, 20, 10, 10], (12, 12), (16.0, 16.0))
    assert on.sum() == 1 and on[1, 1]
    share = probe._share(np.where(on, 0.5, 0.5 / 143), on, 20)
    assert share["top"] == pytest.approx(1 / 20) and share["mass"] == pytest.approx(0.5)


def test_mechanism_recorder_changes_nothing(tmp_path):
    """The recorder's attention measurement runs the bottom-up network in training mode on
    validation images: the model's parameters and buffers (BN running statistics) and the RNG
    states (torch's, numpy's) are as before; its record holds the attention of every object's
    centre."""
    from types import SimpleNamespace

    from detectron2.modeling import build_model
    from utils import PROBE_YAML, load_cfg

    probe = _probe_module()
    root = str(tmp_path / "cue")
    generate_relation_coco(root, "cue", num_train=1, num_val=3)
    cfg = load_cfg(PROBE_YAML, ["MODEL.FPN.OUT_CHANNELS", 16])
    model = build_model(cfg).train()
    gt = _coco(root, "val")
    hook = probe.mechanism_recorder(cfg, gt, os.path.join(root, "val"), "cue")
    hook.trainer = SimpleNamespace(model=model, max_iter=30, iter=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    np.random.seed(5)  # the training loader's flips draw from numpy's global RNG
    hook.before_train()
    hook.before_step()
    assert torch.equal(torch.get_rng_state(), rng)
    assert np.random.randint(2**31) == np.random.RandomState(5).randint(2**31)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hook.record["attention_iters"] == [0]
    att = hook.record["attention"]["pairwise"]
    assert att["queries"] == [len(gt["annotations"])]
    assert 0 < att["entropy"][0] <= att["uniform"][0] == pytest.approx(np.log(144))
    assert probe.mechanism_iters(30) == [0, 1, 2, 3, 4, 5, 10, 20, 30]


@pytest.mark.slow
def test_probe_quick_runs_end_to_end(tmp_path, monkeypatch, capsys):
    out = tmp_path / "probe"
    env = dict(os.environ, NONLOCAL_DET_DATASETS=str(tmp_path / "cache"))
    cmd = [
        sys.executable,
        PROBE,
        "--quick",
        "--output-dir",
        str(out),
        "--json",
        str(out / "s.json"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    probe = _probe_module()
    for model in probe.FAMILY_MODELS:
        assert probe.LABELS[model] in text, model
    assert "red -> blue" in text and "wall time" in text and "machine:" in text
    assert "target 1" in text and "target 2" in text
    summary = json.load(open(out / "s.json"))["summary"]
    assert set(summary) == set(probe.FAMILY_MODELS)
    assert summary["baseline"]["attention"] == {}
    assert set(summary["nonlocal"]["attention"]) == {"pairwise"}
    assert set(summary["global_context"]["attention"]) == {"map"}
    assert set(summary["disentangled"]["attention"]) == {"pairwise", "map"}
    assert set(summary["criss_cross"]["attention"]) == {"pairwise", "two_pass"}
    for model in probe.FAMILY_MODELS:
        if model != "baseline":
            assert (out / f"{model}_seed1" / "attention.png").is_file(), model
    # the mechanism's record: gradients every iteration, the attention at 0, 1 and the end
    mech = json.load(open(out / "nonlocal_seed1" / "result.json"))["mechanism"]
    assert mech["grad_iters"] == [0, 1] and mech["attention_iters"] == [0, 1, 2]
    assert mech["grad"]["theta.weight"][0] == 0 < mech["grad"]["out.weight"][0]  # W_z = 0
    att = mech["attention"]["pairwise"]
    assert all(0 < e <= u + 1e-9 for e, u in zip(att["entropy"], att["uniform"]))
    mech = json.load(open(out / "global_context_seed1" / "result.json"))["mechanism"]
    assert "conv_mask.weight" in mech["grad"] and set(mech["attention"]) == {"map"}
    assert json.load(open(out / "baseline_seed1" / "result.json"))["mechanism"] == {}
    # a second run reuses every result (here in this process: with nothing left to train it
    # starts no worker)
    monkeypatch.setenv("NONLOCAL_DET_DATASETS", env["NONLOCAL_DET_DATASETS"])
    capsys.readouterr()
    assert probe.main([str(a) for a in cmd[2:]]) == 0
    again = capsys.readouterr().out
    assert "6 run(s) already in" in again and "wall time" in again
