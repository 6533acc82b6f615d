#!/usr/bin/env python3
"""Tests of bench/cpu_busy.py (run by scripts/test.sh)."""
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_busy  # noqa: E402


class BusyPercent(unittest.TestCase):
    def test_idle_and_iowait_are_not_busy(self):
        before = "cpu  100 0 100 1000 50 0 0 0 0 0"
        # +300 user, +100 system, +400 idle, +200 iowait: 400 of 1000 ticks busy.
        after = "cpu  400 0 200 1400 250 0 0 0 0 0"
        self.assertAlmostEqual(cpu_busy.busy_percent(before, after), 40.0)

    def test_no_time_passed_is_zero(self):
        line = "cpu  1 2 3 4 5 6 7 8 0 0"
        self.assertEqual(cpu_busy.busy_percent(line, line), 0.0)

    def test_other_lines_and_reversed_snapshots_are_refused(self):
        with self.assertRaises(ValueError):
            cpu_busy.busy_percent("cpu0 1 2 3 4 5", "cpu0 1 2 3 4 5")
        with self.assertRaises(ValueError):
            cpu_busy.busy_percent("cpu  9 9 9 9 9 9", "cpu  1 1 1 1 1 1")

    def test_this_host_reads(self):
        with open("/proc/stat") as stat:
            line = stat.readline()
        self.assertEqual(cpu_busy.busy_percent(line, line), 0.0)


if __name__ == "__main__":
    unittest.main()
