"""Utilities that every layer of detframe may use: process groups (`comm`)."""
