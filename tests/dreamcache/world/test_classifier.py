import torch

from dreamcache.world import scene as world
from dreamcache.world.pool import pixels, render_pool
from dreamcache.world.classifier import HEADS, IGNORE, AttributeClassifier, labels


def test_labels_hide_the_pattern_colour_of_plain_products():
    plain = next(p for p in map(world.product, range(100)) if p.pattern == "plain")
    striped = next(p for p in map(world.product, range(100)) if p.pattern != "plain")
    assert labels(plain, "snow")["pattern_color"] == IGNORE
    assert HEADS["pattern_color"][labels(striped, "snow")["pattern_color"]] == striped.pattern_color
    assert HEADS["scene"][labels(plain, "snow")["scene"]] == "snow"
    assert HEADS["family"][labels(plain, "snow")["family"]] == plain.family


def test_round_trip_keeps_predictions(tmp_path):
    torch.manual_seed(0)
    model = AttributeClassifier(64, width=16).eval()
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    model.save_pretrained(tmp_path)
    loaded = AttributeClassifier.from_pretrained(tmp_path)
    for head, logits in model(images).items():
        assert torch.allclose(logits, loaded(images)[head], atol=5e-2), head  # weights stored in fp16


def test_it_learns_every_head_from_labelled_scenes():
    pool = render_pool(32, seed=1, resolution=64)
    images, targets = pixels(pool.targets), pool.labels
    torch.manual_seed(0)
    model = AttributeClassifier(64, width=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model.loss(images, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predicted = model.eval().predict(images)
    for head in HEADS:
        visible = targets[head] != IGNORE
        assert (predicted[head][visible] == targets[head][visible]).float().mean() > 0.9, head
