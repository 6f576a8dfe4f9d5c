"""Rehearse the device software as arm64 code under qemu-user: root file system, wheels, fake CPU, harness."""
