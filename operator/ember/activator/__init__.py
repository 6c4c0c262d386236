"""activator"""
