"""Study files of two shapes images: the image tables read back to equal studies, draw the images the
task draws, and every wrong table is one error naming the key (test_serve_image_study runs them).
The error cases share a study head; each names its inputs, metric and the message expected."""

from __future__ import annotations

import tomllib

import pytest
import torch

from crosspatch.study import StudyError
from crosspatch.study.images import draw_image, image_inputs
from crosspatch.study.spec import parse_study

HEAD = 'model = "m"\n[[analysis]]\nmethod = "activation_patching"\nsites = "latent.z[dim=*]"\n'


def _parse(text: str):
    return parse_study(tomllib.loads(text))


def test_image_tables_fill_in_their_defaults_and_write_back():
    study = _parse('model = "m"\nmetric = "closeness"\nseed = 5\n[inputs]\nimage = { index = 2, n = 4 }\n'
                   'toward = { factor = "shape", side = "b", split = "test" }\n'
                   '[[analysis]]\nmethod = "activation_patching"\nsites = "latent.z[dim=*]"\n')
    assert study.inputs.task == "shapes"
    assert study.inputs.image == {"split": "train", "seed": 5, "n": 4, "index": 2}  # the study's seed by default
    assert study.inputs.toward == {"factor": "shape", "side": "b", "split": "test", "seed": 5, "n": 1, "index": 0}
    text = study.to_toml()
    assert "n = 16" not in text and 'split = "test"\n' not in text  # the text studies' keys stay out
    assert _parse(text) == study
    pair = _parse('model = "m"\nmetric = "caption_logit_diff"\n[inputs]\npair = { factor = "colour", n = 3, index = 1 }\n'
                  'captions = ["a red square", "a green square"]\n' + HEAD.split("\n", 1)[1])
    a, b = pair.inputs.images()
    assert a == {"factor": "colour", "split": "train", "seed": 0, "n": 3, "index": 1, "side": "a"} and b["side"] == "b"
    assert _parse(pair.to_toml()) == pair


def test_a_table_draws_what_the_task_draws():
    from crosspatch.zoo.tasks import get_task

    task = get_task("shapes")
    pairs = task.pairs(3, seed=4, split="test", factor="scale")
    spec = {"factor": "scale", "split": "test", "seed": 4, "n": 3, "index": 2}
    for side, batch in (("a", pairs.clean), ("b", pairs.corrupt)):
        image, caption = draw_image("shapes", {**spec, "side": side})
        assert torch.equal(image, batch.images[2:3]) and caption == batch.captions[2]
    sample = task.sample(5, seed=1, split="train")
    image, caption = draw_image("shapes", {"split": "train", "seed": 1, "n": 5, "index": 4})
    assert torch.equal(image, sample.images[4:5]) and caption == sample.captions[4]
    with pytest.raises(StudyError, match="wobble.*rotation"):  # an unknown factor: the task's error, naming the factors
        draw_image("shapes", {"factor": "wobble", "side": "a", "split": "train", "seed": 0, "n": 1, "index": 0})


@pytest.mark.parametrize("inputs, metric, message", [
    ('image = { index = 0 }\ntoward = { index = 0, split = "test" }', None, "a study of images needs a metric"),
    ('image = { index = 0 }\ntoward = { index = 0, split = "test" }', "logit_diff", "metric = 'logit_diff' is not for a study of images"),
    ('task = "ioi"\nn = 2', "closeness", "metric = 'closeness' is not for a study of prompts"),
    ('image = { index = 0 }', "closeness", "image (A, the run patched into) and toward (B, the source) come together"),
    ('pair = { factor = "x" }\nimage = { index = 0 }', "closeness", "gives a pair and image/toward"),
    ('image = { index = 3, n = 3 }\ntoward = { index = 0 }', "closeness", "[inputs] image: index = 3 of n = 3"),
    ('image = { index = 0, split = "val" }\ntoward = { index = 0 }', "closeness", "split = 'val'; splits: train, test"),
    ('image = { factor = "x" }\ntoward = { index = 0 }', "closeness", "factor and side come together"),
    ('image = { factor = "x", side = "c" }\ntoward = { index = 0 }', "closeness", "side = 'c'"),
    ('pair = { index = 0 }', "closeness", "[inputs] pair needs a factor"),
    ('pair = { factor = "x", side = "a" }', "closeness", "[inputs] pair has unknown keys ['side']"),
    ('pair = { factor = "x" }\nn = 4', "closeness", "['n'] belong to text studies"),
    ('pair = { factor = "x" }\ncaptions = ["a", "a"]', "caption_logit_diff", "give two different captions"),
    ('task = "ioi"\ncaptions = ["a", "b"]', None, "captions go with images"),
])
def test_bad_image_inputs_name_the_key(inputs, metric, message):
    text = (f'metric = "{metric}"\n' if metric else "") + HEAD + "[inputs]\n" + inputs + "\n"
    with pytest.raises(StudyError) as info:
        _parse(text)
    assert message in str(info.value)


def test_an_image_metric_names_the_model_it_needs():
    from test_serve_images import tiny_vae

    import crosspatch as cp

    study = _parse('model = "tiny"\nmetric = "caption_logit_diff"\n[inputs]\npair = { factor = "colour" }\n'
                   + HEAD.split("\n", 1)[1])
    with pytest.raises(StudyError, match="'caption_logit_diff' is for a CLIP model, and 'tiny' is a VAE model"):
        image_inputs(study, cp.wrap(tiny_vae()))


def test_the_example_image_studies_read():
    from pathlib import Path

    from crosspatch.study import load_study
    from crosspatch.study.analyses import IMAGE_METHODS

    examples = Path(__file__).resolve().parents[2] / "examples"
    for name, model, metric in (("shapes_vae_study.toml", "shapes-vae", "closeness"),
                                ("shapes_clip_study.toml", "shapes-clip", "caption_logit_diff")):
        study = load_study(examples / name)
        assert (study.model, study.metric, study.inputs.task) == (model, metric, "shapes")
        assert study.inputs.pair == {"factor": "colour", "split": "train", "seed": 0, "n": 1, "index": 0}
        assert {a.method for a in study.analyses} <= set(IMAGE_METHODS)
