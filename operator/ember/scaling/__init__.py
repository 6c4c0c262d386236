"""Scaling decisions as pure functions of numbers and a clock: the KPA-style autoscaler (`autoscaler`)."""
