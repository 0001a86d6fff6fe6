"""(to be written in this session: see issue 13)"""
