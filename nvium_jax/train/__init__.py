"""Sharded pretraining: mesh and rules, optimizer, train step, loop, metrics, plan, bench."""
