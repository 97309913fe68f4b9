"""Making a cache smaller on a pretrained model: conversion to TPA factors, rank allocation under a cache
budget, and healing by distillation against the original."""
