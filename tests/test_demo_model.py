"""The demo model's data, region targets and training script (the trained checkpoint is not shipped yet).

What is tested: the generator is a pure function of the seed, its questions are unambiguous, the region targets
are cut exactly as the runtime tiles the image, and a few training steps write a checkpoint in the original
OpenGVLab layout that the exporter loads and that answers through the same path as the evaluation.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from vl_export.errors import CheckpointError
from vl_export.export.checkpoint import load, resolve
from vl_export.export.demo import CHECKPOINT, data, regions
from vl_export.runtime.preprocess import TilingConfig, preprocess


def test_examples_are_a_function_of_their_seed():
    a, b = data.example(123), data.example(123)
    assert (a.question, a.answer, a.kind) == (b.question, b.answer, b.kind)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert data.example(124).image.size != a.image.size or data.example(124).question != a.question


def test_heldout_set_is_balanced_and_disjoint_from_training_seeds():
    heldout = data.heldout(20)
    assert [e.kind for e in heldout] == list(data.KINDS) * 4
    assert min(e.seed for e in heldout) >= data.HELDOUT_SEED


@pytest.mark.parametrize("seed", range(30))
def test_questions_have_one_right_answer(seed):
    scene = data.make_scene(random.Random(seed))
    assert len({(item.shape, item.colour) for item in scene.items}) == 1, "a scene shows one kind of object"
    item = scene.items[0]
    assert [f.answer for f in data.facts(scene, "colour")] == [item.colour]
    assert [f.answer for f in data.facts(scene, "shape")] == [item.shape]
    assert [f.answer for f in data.facts(scene, "count")] == [str(len(scene.items))]
    assert [f.answer for f in data.facts(scene, "text")] == [scene.text]
    for fact in data.facts(scene, "position"):
        assert len(scene.items) == 1
        cx, cy = item.centre
        side = {"left": cx < scene.width / 2, "right": cx > scene.width / 2, "top": cy < scene.height / 2,
                "bottom": cy > scene.height / 2}
        assert side[fact.answer]


def test_region_targets_follow_the_runtimes_tiling(tiny_demo_spec):
    spec = tiny_demo_spec
    for seed in range(5):
        scene = data.make_scene(random.Random(seed))
        tiles = preprocess(data.render(scene), TilingConfig(spec.image_size, 1, spec.max_dynamic_patch, True))
        targets = regions.targets(scene, spec)
        tokens = (spec.vision.grid // spec.shuffle_factor) ** 2
        assert targets["colour"].shape == (len(tiles), tokens, len(regions.COLOUR_CLASSES))
        assert targets["centre"].shape == (len(tiles), tokens)
        coverage = targets["colour"].sum(-1)
        assert np.allclose(coverage.numpy(), 1.0, atol=1e-5), "each token's coverage sums to one"
        # Every object's centre is flagged in the thumbnail (the last tile), which sees the whole image.
        assert int(targets["centre"][-1].sum()) >= 1


@pytest.fixture(scope="module")
def tiny_demo_spec():
    from vl_export.export.demo.train import DEMO_CONFIG
    from vl_export.spec import ModelSpec

    config = {**DEMO_CONFIG, "llm_config": {**DEMO_CONFIG["llm_config"], "vocab_size": 1024, "bos_token_id": 0,
                                            "eos_token_id": 1}}
    return ModelSpec.from_config(config)


def test_a_few_training_steps_write_an_original_layout_checkpoint_that_loads_and_answers(tmp_path):
    import torch

    from vl_export.export.demo.evaluate import Answerer
    from vl_export.export.demo.train import train

    torch.manual_seed(0)
    out = train(tmp_path / "ckpt", steps=2, vision_steps=2, batch_size=1, vision_batch_size=1, max_turns=2,
                log_every=1, save_every=10)
    checkpoint = load(out)
    assert checkpoint.spec.layout == "original"
    assert (checkpoint.spec.max_dynamic_patch, checkpoint.spec.use_thumbnail) == (data.MAX_TILES, True)
    example = data.heldout(1)[0]
    answer = Answerer(checkpoint)(example.image, example.question, max_new_tokens=2)
    assert isinstance(answer, str)
    # A continuation starts from those weights (not from a fresh random model) and writes the same layout.
    more = train(tmp_path / "more", steps=1, vision_steps=0, batch_size=1, max_turns=2, init=out, first_seed=100,
                 warmup=1, log_every=1)
    before = checkpoint.model.state_dict()
    after = load(more).model.state_dict()
    assert after.keys() == before.keys()
    drift = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < drift < 0.05, drift  # one small step from the init, far from a re-initialisation


def test_demo_model_without_a_shipped_checkpoint_is_one_clear_line():
    if (CHECKPOINT / "config.json").is_file():
        pytest.skip("a demo checkpoint is installed")
    with pytest.raises(CheckpointError) as error:
        resolve("demo")
    assert "python -m vl_export.export.demo.train" in str(error.value) and "\n" not in str(error.value)

def test_head_warmup_leaves_the_model_alone(tmp_path):
    """A continuation's fresh region heads are fitted on frozen features first: the model's weights do not move."""
    from vl_export.export.demo.train import train

    out = train(tmp_path / "ckpt", steps=1, vision_steps=1, batch_size=1, vision_batch_size=1, max_turns=2, log_every=1)
    warmed = train(tmp_path / "warm", steps=0, vision_steps=0, head_warmup=2, init=out, first_seed=100, log_every=1)
    before, after = load(out).model.state_dict(), load(warmed).model.state_dict()
    assert max(float((after[k] - before[k]).abs().max()) for k in before) == 0


def test_answer_loss_is_the_mean_cross_entropy_and_weights_kinds():
    import torch

    from vl_export.export.demo.train import answer_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, 5, 6, 7, 8, -100]])
    kinds = [[None, None, "count", "count", None, None], [None, "text", "text", "position", "position", None]]
    # Unweighted: the mean next-token cross-entropy over labelled tokens, as transformers computes it.
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(answer_loss(logits, labels, kinds, {}), expected)
    # Weighted: each labelled token's loss times its kind's weight, over the summed weights.
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none")
    weights = torch.tensor([0, 3, 3, 0, 0, 1, 1, 3, 3, 0], dtype=torch.float32)  # count x3, position x3, text x1
    weighted = answer_loss(logits, labels, kinds, {"count": 3.0, "position": 3.0})
    assert torch.allclose(weighted, (nll * weights).sum() / weights.sum())
    assert not torch.allclose(weighted, expected)


def test_scene_weights_draw_more_scenes_of_a_kind():
    weighted = [data.conversation(seed, 1, scene_weights={"position": 20.0})[1][0][2] for seed in range(60)]
    even = [data.conversation(seed, 1)[1][0][2] for seed in range(60)]
    assert weighted.count("position") > 45  # 20/24 expected
    assert even.count("position") < 25  # 1/5 expected
    scene, turns = data.conversation(7, 10, scene_weights={"position": 20.0})
    assert len(scene.items) == 1 and turns[0][2] == "position"  # a position question needs one object
