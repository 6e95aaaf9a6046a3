#!/usr/bin/env python3
"""Parses a Prometheus scrape (OpenMetrics text) from standard input with the reference
parser of the Python client, and prints every sample as one JSON object:
{"name{label=value,...}": value}. A scrape the parser refuses ends with an error."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        samples[f"{s.name}{{{labels}}}"] = s.value
json.dump(samples, sys.stdout, sort_keys=True)
