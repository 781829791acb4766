// SpinWord: a one-word spin lock for critical sections of a few instructions on per-processor data
// (the allocator's per-CPU page lists, the LRU add batches), where a System.Threading.Lock would cost
// more than the work it guards. The word is 0 when free; a holder stores 1 in Release (the fast path is
// one CompareExchange) and its managed thread id in Debug, so LockAssert can ask "held by this thread"
// and a thread that takes a word it already holds fails loudly instead of spinning forever.
//
// Locking: it is the lock; its place in the order is its user's (docs/locking.md).
using System.Runtime.CompilerServices;
using Vmm.Diagnostics;

namespace Vmm.Memory;

/// <summary>A spin lock in one int (see the file overview). A field of its owner; never copied.</summary>
internal struct SpinWord
{
    private int _word;

#if DEBUG
    private static int HeldValue => Environment.CurrentManagedThreadId;
#else
    private const int HeldValue = 1;
#endif

    /// <summary>Takes the word, spinning while another thread holds it. <paramref name="name"/> names it in the Debug self-deadlock check.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Enter(string name)
    {
        if (Interlocked.CompareExchange(ref _word, HeldValue, 0) != 0)
            EnterContended(name);
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private void EnterContended(string name)
    {
        LockAssert.That(Volatile.Read(ref _word) != Environment.CurrentManagedThreadId,
            $"{name} not already held by this thread (it would spin forever)");
        var spinner = new SpinWait();
        while (Volatile.Read(ref _word) != 0 || Interlocked.CompareExchange(ref _word, HeldValue, 0) != 0)
            spinner.SpinOnce();
    }

    /// <summary>Releases the word. The caller checks it holds it (LockAssert) first.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Exit() => Volatile.Write(ref _word, 0);

#if DEBUG
    /// <summary>Debug only: whether this thread holds the word (it stores its managed thread id).</summary>
    public readonly bool IsHeldByCurrentThread => Volatile.Read(in _word) == Environment.CurrentManagedThreadId;
#endif
}
