"""Orientation: the directory of sites, the reading groups and the on-call rota,
answering "which group handles a request from site X at time T?"."""
