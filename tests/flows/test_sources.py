import json

import pytest
from pydantic import ValidationError

from flows.platform.params import CatalogueRunParams
from flows.platform.resources import safe_key_part
from flows.platform.places import Places
from flows.steps.source import list_source


def test_a_folder_gives_skus_from_file_names_and_categories_from_folders(catalogue):
    listing = list_source(str(catalogue))
    assert {(i.sku, i.category) for i in listing.items} == {
        ("MUG-1", "mug"), ("MUG-2", "mug"), ("BROKEN", "mug"), ("LAMP-1", "lamp"), ("NOT-AN-IMAGE", "lamp")}


def test_a_csv_manifest(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "products.csv").write_text(
        "sku,category,image_uri,color\n"
        "MUG-1,mug,a.png,red\n"
        "MUG-1,mug,a.png,red\n"
        ",mug,a.png,\n"
        "LAMP-1,lamp,s3://bucket/lamp.jpg,\n")
    places = Places.for_run(str(tmp_path / "products.csv"), [str(tmp_path), "s3://bucket/"])
    listing = list_source(str(tmp_path / "products.csv"), places)
    assert [(i.sku, i.uri, i.attributes) for i in listing.items] == [
        ("MUG-1", f"{tmp_path}/a.png", {"color": "red"}), ("LAMP-1", "s3://bucket/lamp.jpg", {})]
    assert [reason for _, reason in listing.rejected] == ["duplicate of line 2 (same SKU and image)",
                                                          "empty sku or image_uri"]
    assert listing.rejected[0][0].endswith("products.csv line 3")


def test_a_jsonl_manifest_with_a_broken_line(tmp_path):
    lines = [json.dumps({"sku": "A", "image_uri": "s3://b/a.png", "category": "mug"}), "{not json", ""]
    (tmp_path / "products.jsonl").write_text("\n".join(lines))
    listing = list_source(str(tmp_path / "products.jsonl"), Places.for_run(str(tmp_path), [str(tmp_path), "s3://b"]))
    assert [i.sku for i in listing.items] == ["A"]
    assert "line 2" in listing.rejected[0][0] and "not valid JSON" in listing.rejected[0][1]


def test_a_manifest_without_the_required_columns_is_refused(tmp_path):
    (tmp_path / "products.csv").write_text("name,picture\nMUG,a.png\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) sku, image_uri"):
        list_source(str(tmp_path / "products.csv"))


def test_a_missing_source_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder, an s3:// prefix nor a .csv/.jsonl manifest"):
        list_source(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("sku", ["../../etc/passwd", "a/b", "SKU 1", ".hidden", "ünïcødé", "x" * 300])
def test_skus_become_safe_distinct_key_parts(sku):
    part = safe_key_part(sku)
    assert "/" not in part and not part.startswith(".") and len(part) <= 89
    assert safe_key_part(sku) == part and safe_key_part(sku + "!") != part


def test_a_sku_written_like_an_escaped_one_gets_a_folder_of_its_own():
    escaped = safe_key_part("a b")
    assert escaped.startswith("a_b-") and safe_key_part(escaped) != escaped
    skus = ["a b", escaped, "a_b", "a?b", safe_key_part("a?b"), "A-1", "A-12345678"]
    assert len({safe_key_part(sku) for sku in skus}) == len(skus)
    assert safe_key_part("MUG-RED-1") == "MUG-RED-1"  # plain SKUs keep their name


def test_parameters_are_validated():
    with pytest.raises(ValidationError, match="give prompts, a prompt_file, or both"):
        CatalogueRunParams(source="s3://b/")
    with pytest.raises(ValidationError, match="prompt 2 has 1001 characters"):
        CatalogueRunParams(source="s3://b/", prompts=["ok", "x" * 1001])
    with pytest.raises(ValidationError, match="output_prefix"):
        CatalogueRunParams(source="s3://b/", prompts=["ok"], output_prefix="../escape")
    with pytest.raises(ValidationError, match="must not have empty, '.' or '..' parts"):
        CatalogueRunParams(source="s3://b/", prompts=["ok"], output_prefix="shots/../../escape")
    params = CatalogueRunParams(source="s3://b/", prompts=["a\tmug\x00 on  a beach"])
    assert params.prompts == ["a mug on a beach"]
