"""Reading metrics the way a scraper does: Prometheus's own text parser, the OTel SDK's
in-memory reader."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by (sample name, labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``name``'s samples summed by one label."""
    totals: dict[str, float] = {}
    for (sample, labels), found in samples.items():
        if sample == name:
            key = dict(labels)[label]
            totals[key] = totals.get(key, 0.0) + found
    return totals


def series(samples: Samples, prefix: str = "") -> int:
    """How many series (samples) there are, of names starting with ``prefix``."""
    return sum(1 for name, _ in samples if name.startswith(prefix))


def otel_points(reader: Any) -> dict[str, list[tuple[Mapping[str, Any], Any]]]:
    """The in-memory reader's data points by instrument name: (attributes, point)."""
    points: dict[str, list[tuple[Mapping[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    if data is None:
        return points
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    points.setdefault(metric.name, []).append((point.attributes, point))
    return points


def otel_sum_by(
    points: dict[str, list[tuple[Mapping[str, Any], Any]]], name: str, label: str
) -> dict[str, float]:
    """A counter's values summed by one attribute."""
    totals: dict[str, float] = {}
    for attributes, point in points.get(name, []):
        key = str(attributes[label])
        totals[key] = totals.get(key, 0.0) + point.value
    return totals
