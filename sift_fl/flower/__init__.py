"""Flower adapters: record conversion, the message protocol and the SIFT-Masks strategy."""
