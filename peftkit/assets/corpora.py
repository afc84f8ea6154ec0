"""Turn the raw files that packages ship (MEDLINE XML, a Wikipedia dump, MMLU JSONL) into JSONL corpora."""

from __future__ import annotations

import bz2
import gzip
import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

from peftkit.data.splits import split_of
from peftkit.dedup import matches
from peftkit.progress import bar

MIN_ABSTRACT_WORDS = 30  # shorter abstracts are mostly placeholders ("No abstract available") or fragments
MIN_ARTICLE_WORDS = 50

SPLITS = ("train", "validation", "test")


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


# --- PubMed ---------------------------------------------------------------------------------------


def _text(element: ET.Element | None) -> str:
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


def iter_medline(path: Path) -> Iterator[dict]:
    """Yield {pmid, title, abstract, journal, year} for each article in a MEDLINE .xml.gz file."""
    with gzip.open(path) as stream:
        for _, element in ET.iterparse(stream):
            if element.tag != "PubmedArticle":
                continue
            citation = element.find("MedlineCitation")
            article = citation.find("Article") if citation is not None else None
            if article is not None:
                sections = []
                for part in article.iterfind("Abstract/AbstractText"):
                    body, label = _text(part), part.get("Label")
                    if body:
                        sections.append(f"{label.capitalize()}: {body}" if label else body)
                yield {
                    "pmid": _text(citation.find("PMID")),
                    "title": _text(article.find("ArticleTitle")),
                    "abstract": "\n".join(sections),
                    "journal": _text(article.find("Journal/Title")),
                    "year": _text(article.find("Journal/JournalIssue/PubDate/Year")),
                }
            element.clear()


def write_pubmed(sources: list[Path], out: Path) -> None:
    seen: set[str] = set()
    records = {split: [] for split in SPLITS}
    dropped = 0
    for source in sources:
        for rec in bar(iter_medline(source), desc=f"parse {source.name}", unit="article", leave=False):
            if not rec["pmid"] or rec["pmid"] in seen:
                continue
            seen.add(rec["pmid"])
            if len(rec["abstract"].split()) < MIN_ABSTRACT_WORDS:
                dropped += 1
                continue
            rec["text"] = f"{rec['title']}\n\n{rec['abstract']}" if rec["title"] else rec["abstract"]
            records[split_of("pmid:" + rec["pmid"])].append(rec)
    # MEDLINE holds the same abstract under several PMIDs now and then: a held-out copy of a
    # training document would make held-out scores optimistic, so held-out copies are dropped.
    train_texts = [r["text"] for r in records["train"]]
    stats = {"dropped_short_or_empty": dropped}
    for split in ("validation", "test"):
        leaked = matches(train_texts, [r["text"] for r in records[split]])
        records[split] = [r for i, r in enumerate(records[split]) if i not in leaked]
        stats[f"dropped_{split}_duplicating_train"] = len(leaked)
    stats.update({split: write_jsonl(out / f"{split}.jsonl", recs) for split, recs in records.items()})
    (out / "stats.json").write_text(json.dumps(stats, indent=2))


# --- Wikipedia ------------------------------------------------------------------------------------

# Articles of the shipped sample that are about medicine; the category check below catches others.
MEDICAL_TITLES = {"Autism", "Anatomy", "Abortion"}
MEDICAL_CATEGORY = re.compile(  # a category about medicine itself, not e.g. "People with mood disorders"
    r"\[\[Category:(?!People)(?![^\]]*deaths)(?:(?:Medic|Disease|Anatom|Surg|Pharmac|Patholog|Obstetric)[^\]]*|[^\]]*disorders)\]\]",
    re.IGNORECASE,
)
_END_SECTIONS = re.compile(r"^==\s*(References|External links|See also|Further reading|Notes|Bibliography)\s*==",
                           re.MULTILINE | re.IGNORECASE)  # fmt: skip


def strip_wiki(markup: str) -> str:
    """Reduce MediaWiki markup to plain paragraphs (good enough for perplexity, not a full parser)."""
    text = _END_SECTIONS.split(markup, maxsplit=1)[0]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    previous = None
    while previous != text:  # innermost first, so nested templates, tables and links come apart
        previous = text
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.DOTALL)
        text = re.sub(r"\[\[(?:File|Image|Category|[a-z]{2,3}):[^\[\]]*\]\]", "", text, flags=re.IGNORECASE)
        text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://[^\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.MULTILINE)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text)
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^[*#:;]+\s*", "", line).strip()
        if line and not line.startswith(("|", "!", "{", "}")):
            lines.append(line)
    return "\n".join(lines)


def iter_wiki(path: Path) -> Iterator[dict]:
    with bz2.open(path) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            ns = element.tag[: -len("page")]
            title = element.findtext(f"{ns}title") or ""
            markup = element.findtext(f"{ns}revision/{ns}text") or ""
            namespace = element.findtext(f"{ns}ns")
            if namespace == "0" and element.find(f"{ns}redirect") is None:
                yield {"title": title, "markup": markup}
            element.clear()


def write_wiki(source: Path, out: Path) -> None:
    kept, excluded = [], []
    for page in bar(iter_wiki(source), desc=f"parse {source.name}", unit="page", leave=False):
        if page["title"] in MEDICAL_TITLES or MEDICAL_CATEGORY.search(page["markup"]):
            excluded.append(page["title"])
            continue
        text = strip_wiki(page["markup"])
        if len(text.split()) >= MIN_ARTICLE_WORDS:
            kept.append({"title": page["title"], "text": f"{page['title']}\n\n{text}"})
    write_jsonl(out / "general.jsonl", kept)
    (out / "stats.json").write_text(json.dumps({"articles": len(kept), "excluded_medical": excluded}, indent=2))


# --- MMLU -----------------------------------------------------------------------------------------


def write_mmlu(source: Path, out: Path) -> None:
    def records() -> Iterator[dict]:
        with open(source, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row["question"] == "question":  # the file repeats its header row twice mid-file
                    continue
                yield {
                    "subject": row["topic"],
                    "question": row["question"],
                    "choices": [row[f"answer_{k}"] for k in "abcd"],
                    "answer": "ABCD".index(row["correct_answer"]),
                }

    count = write_jsonl(out / "mmlu.jsonl", records())
    (out / "stats.json").write_text(json.dumps({"questions": count}, indent=2))
