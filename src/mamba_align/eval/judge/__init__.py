"""eval/judge"""
