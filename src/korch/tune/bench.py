"""placeholder"""
def register(bench):
    pass
