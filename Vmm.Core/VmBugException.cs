namespace Vmm;

/// <summary>
/// An internal invariant of the memory manager was broken (Linux's VM_BUG_ON / bad_page): a double
/// free, a flag used against its compound-page policy, a page freed while still mapped. It names a
/// bug in Vmm or in a caller that reached past the public API, never an expected failure.
/// </summary>
/// <remarks>Thread safety: the properties this exception adds are immutable; the members it inherits from <see cref="Exception"/> are not thread-safe.</remarks>
public sealed class VmBugException : Exception
{
    /// <summary>Creates the exception.</summary>
    public VmBugException() { }

    /// <summary>Creates the exception with a message.</summary>
    public VmBugException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and cause.</summary>
    public VmBugException(string message, Exception inner) : base(message, inner) { }
}
