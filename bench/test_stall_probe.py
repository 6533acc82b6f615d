#!/usr/bin/env python3
"""Tests of the stall probe's analysis (run by scripts/test.sh): synthetic completion logs with
known stalls, and a check that the floor is what the definition gives."""
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stall_probe  # noqa: E402


def steady(start_ms, end_ms, interval_ms):
    t, out = start_ms, []
    while t <= end_ms:
        out.append(float(t))
        t += interval_ms
    return out


class Analyse(unittest.TestCase):
    def test_a_quiet_disk_has_no_floor(self):
        result = stall_probe.analyse(steady(0, 10_000, 4), 4.0, 0)
        self.assertEqual(result["stalls_over_10ms"], 0)
        self.assertEqual(result["floor_p99_ms"], 0.0)
        self.assertEqual(result["stalled_share"], 0.0)

    def test_one_long_stall_sets_the_floor(self):
        # 10 s of completions every 4 ms, with one 500 ms hole: 1% of 10 s is 100 ms, so the
        # p99 floor w solves (stall - w) = 100 ms, and p99.9 (stall - w) = 10 ms.
        times = [t for t in steady(0, 10_000, 4) if not 5_000 < t < 5_504]
        result = stall_probe.analyse(times, 4.0, 0)
        stall = 504 - 4 - 1  # the gap, less the probe interval and 1 ms of log rounding
        self.assertEqual(result["stalls_over_10ms"], 1)
        self.assertAlmostEqual(result["stall_max_ms"], stall, places=1)
        self.assertAlmostEqual(result["floor_p99_ms"], stall - 100, delta=0.05)
        self.assertAlmostEqual(result["floor_p999_ms"], stall - 10, delta=0.05)
        self.assertAlmostEqual(result["stalled_share"], stall / 10_000, places=4)

    def test_the_warm_up_is_skipped(self):
        times = [t for t in steady(0, 10_000, 4) if not 1_000 < t < 1_504]
        result = stall_probe.analyse(times, 4.0, 2_000)
        self.assertEqual(result["stalls_over_10ms"], 0)

    def test_too_few_writes_is_an_error(self):
        with self.assertRaises(SystemExit):
            stall_probe.analyse([1.0], 4.0, 0)

    def test_fio_log_lines_are_read(self):
        with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
            log.write("0, 192025, 1, 4096, 0\n4, 72157, 1, 4096, 0\nnot a line\n")
        try:
            self.assertEqual(stall_probe.read_log(log.name), [0.0, 4.0])
        finally:
            os.unlink(log.name)


class SyncLatency(unittest.TestCase):
    def test_fdatasync_percentiles_are_read_in_ms(self):
        report = {"jobs": [{"sync": {"lat_ns": {"percentile": {
            "50.000000": 206_000, "99.000000": 2_768_896, "99.900000": 10_420_224}}}}]}
        self.assertEqual(stall_probe.sync_latency(report), {
            "fdatasync_p50_ms": 0.206, "fdatasync_p99_ms": 2.769, "fdatasync_p999_ms": 10.42})

    def test_a_report_without_syncs_is_an_error(self):
        with self.assertRaises(SystemExit):
            stall_probe.sync_latency({"jobs": [{"write": {}}]})
        with self.assertRaises(SystemExit):
            stall_probe.sync_latency({"jobs": [{"sync": {"lat_ns": {"percentile": {
                "50.000000": 1}}}}]})


if __name__ == "__main__":
    unittest.main()
