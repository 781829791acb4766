using System.Reflection;
using Vmm.Native;

namespace Vmm.Tests.Api;

/// <summary>
/// Kernel-level machinery is not the host API (issue 9, part 6): a host must not be able to free a frame
/// that processes map, or write through a raw frame span, because nothing public leads there.
/// </summary>
public sealed class PublicSurfaceTests
{
    private static readonly Assembly Core = typeof(Machine).Assembly;
    private static readonly Assembly Native = typeof(Topology).Assembly;

    [Test]
    public void The_allocator_the_arena_and_the_frame_descriptors_are_not_public()
    {
        string[] machinery = ["PageAllocator", "Zone", "PerCpuPages", "MemMap", "PageDescriptor", "PageLock", "Arena", "ArenaHandle", "AddressSpace", "MappingRegistry", "RmapWalker"];
        string[] publicNames = [.. Core.GetExportedTypes().Concat(Native.GetExportedTypes()).Select(t => t.Name)];
        Assert.That(publicNames, Has.None.AnyOf(machinery), "machinery stays internal; hosts use Machine's calls");
    }

    [Test]
    public void Machine_hands_out_no_allocator_arena_or_raw_frame_span()
    {
        string[] members = [.. typeof(Machine).GetMembers(BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static).Select(m => m.Name)];
        Assert.That(members, Has.None.AnyOf("Allocator", "Arena", "MemMap", "GetFrameSpan", "PageLock"));
        Assert.That(members, Does.Contain(nameof(Machine.ReleaseFreeMemory)).And.Contain(nameof(Machine.GetMemoryBlock)),
            "what a host legitimately needed from the allocator has a call of its own");
    }

    [Test]
    public void No_public_member_returns_machinery_or_takes_a_raw_pointer()
    {
        var offenders = new List<string>();
        foreach (Type type in Core.GetExportedTypes())
        {
            foreach (MethodInfo method in type.GetMethods(BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly))
            {
                if (method.ReturnType.IsPointer || method.GetParameters().Any(p => p.ParameterType.IsPointer))
                    offenders.Add($"{type.Name}.{method.Name}");
            }
        }
        Assert.That(offenders, Is.Empty, "a pointer into the arena would outlive every guard");
    }
}
