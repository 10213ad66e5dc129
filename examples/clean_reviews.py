"""Clean, filter, deduplicate and label product reviews, with a slow per-row "model call".

    cas run examples/clean_reviews.py          # Ctrl+C at any time, then:
    cas resume clean-reviews                   # continues; finished batches are reused
    cas run examples/clean_reviews.py          # a finished pipeline: no step work at all

The labelling step sleeps 10 ms per row to stand in for an LLM call, the kind of work
that costs money and must never be done twice.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from castore import Pipeline, StepInput, StepOutput, step
from castore.steps import DeduplicateRows, FilterRows, KeepColumns, LoadDataFromFileSystem

DATA = Path(__file__).resolve().parent / "data" / "reviews.jsonl"


@step(inputs=["text"], outputs=["text_clean"])
def NormalizeText(inputs: StepInput) -> StepOutput:
    """Collapse whitespace and fix shouting, so duplicates compare equal."""
    for row in inputs:
        text = re.sub(r"\s+", " ", row["text"] or "").strip()
        if text.isupper():
            text = text.capitalize()
        row["text_clean"] = text
    yield inputs


@step(inputs=["text_clean", "stars"], outputs=["sentiment", "label_source"], row_wise=True)
def LabelSentiment(inputs: StepInput, seconds_per_row: float = 0.01) -> StepOutput:
    """Stands in for an LLM call per row: slow, and deterministic for the same input."""
    out = []
    for row in inputs:
        time.sleep(seconds_per_row)
        words = row["text_clean"].lower()
        negative = any(w in words for w in ("broke", "cheap", "never", "stopped", "drains"))
        if row["stars"] >= 4 and not negative:
            label = "positive"
        elif row["stars"] <= 2 or negative:
            label = "negative"
        else:
            label = "mixed"
        out.append({**row, "sentiment": label, "label_source": "simulated-model"})
    return out


with Pipeline(name="clean-reviews", description="Review cleaning and labelling") as pipeline:
    load = LoadDataFromFileSystem(data_files=str(DATA), batch_size=100)
    normalize = NormalizeText(input_batch_size=100)
    keep_long = FilterRows(column="text_clean", op="min_length", value=12, input_batch_size=100)
    dedupe = DeduplicateRows(columns=["product", "text_clean"])
    label = LabelSentiment(input_batch_size=25, concurrency=8)
    final = KeepColumns(columns=["review_id", "product", "stars", "text_clean", "sentiment"])
    load >> normalize >> keep_long >> dedupe >> label >> final


if __name__ == "__main__":
    distiset = pipeline.run()
    print(distiset)
