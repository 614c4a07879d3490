"""Thin front ends: parse arguments, call the engine, print."""
